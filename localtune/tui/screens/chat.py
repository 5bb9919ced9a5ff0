"""The Chat screen of one run: talk to the tuned model, or (compare) to the base model and the
tuned model side by side, each answer streamed as it is generated.

Loading the model (`ChatSession.load`, seconds for the built-in model) and generating run in
thread workers; the text arrives as `AnswerPiece` messages and only the handlers touch
widgets, so keys answer while a model writes. In compare mode each message gets two answers,
base first, then tuned; each side keeps its own conversation, so both see their own answers.
"""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Checkbox, Footer, Input, Static
from textual.worker import get_current_worker

from localtune.chat import ChatSession
from localtune.errors import UserError
from localtune.runs import RunDir
from localtune.tui.widgets import Toggle

SIDES = {"base": "base model", "tuned": "tuned model"}


class ChatMessage(Static):
    """One turn in the transcript: a label line ('you', 'tuned model') and the text, which an
    answer receives piece by piece."""

    def __init__(self, who: str, text: str = "", *, side: str = "you") -> None:
        super().__init__(classes=f"chat-msg chat-{side}")
        self.who, self.text = who, text
        self.error: str | None = None

    def on_mount(self) -> None:
        self._show()

    def append(self, piece: str) -> None:
        self.text += piece
        self._show()

    def fail(self, reason: str) -> None:
        self.error = reason
        self._show()

    def _show(self) -> None:
        body = Text(self.text) if self.text or self.error else Text("…", "dim")
        if self.error:
            body.append(("\n" if self.text else "") + self.error, "italic red")
        self.update(Text.assemble((self.who, "bold"), "\n", body))


class Loaded(Message):
    def __init__(self, session: ChatSession | None, error: str | None = None) -> None:
        super().__init__()
        self.session, self.error = session, error


class LoadProgress(Message):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage


class AnswerPiece(Message):
    """Text the model just wrote into `target`."""

    def __init__(self, target: ChatMessage, piece: str) -> None:
        super().__init__()
        self.target, self.piece = target, piece


class Answered(Message):
    """One side's answer is complete: it joins that side's conversation (`history`)."""

    def __init__(self, history: list[dict[str, str]], prompt: str, answer: str) -> None:
        super().__init__()
        self.history, self.prompt, self.answer = history, prompt, answer


class TurnDone(Message):
    """Every answer to message number `turn` is written (or generating failed: `error`)."""

    def __init__(self, turn: int, target: ChatMessage | None = None, error: str | None = None) -> None:
        super().__init__()
        self.turn, self.target, self.error = turn, target, error


class _Cancelled(Exception):
    """Raised from the streaming callback to stop generate() when the turn was abandoned."""


class ChatScreen(Screen):
    """Chat with `run`'s tuned model: #chat-input, #compare, #transcript (ChatMessage widgets,
    class chat-you / chat-base / chat-tuned), #chat-status."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+t", "toggle_compare", "Compare", tooltip="the base model answers too, side by side"),
        Binding("ctrl+l", "clear", "Clear", tooltip="start a new conversation"),
    ]

    def __init__(self, run: RunDir) -> None:
        super().__init__()
        self.run = run
        self.session: ChatSession | None = None
        self.histories: dict[str, list[dict[str, str]]] = {"base": [], "tuned": []}
        """Each side's conversation so far (user and assistant turns)."""
        self.generating = False
        self._turn = 0

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-top"):
            yield Static(Text.assemble(("Chat ", "bold"), "with run ", (self.run.id, "bold")), id="chat-title")
            yield Toggle("compare with the base model", id="compare", compact=True)
        with VerticalScroll(id="transcript"):
            yield Static("loading the tuned model ...", id="chat-status", classes="dim")
        yield Input(id="chat-input", placeholder="loading ...", disabled=True, compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.load()

    # ------------------------------------------------------------ loading

    @work(thread=True, group="load")
    def load(self) -> None:
        """The base model and the adapter: seconds for the built-in model, minutes for 7B."""
        try:
            session = ChatSession.load(self.run, progress=lambda stage, done, total: self.post_message(
                LoadProgress(stage)))
        except UserError as e:
            self.post_message(Loaded(None, str(e)))
        else:
            self.post_message(Loaded(session))

    def on_load_progress(self, message: LoadProgress) -> None:
        if self.session is None:
            self.query_one("#chat-status", Static).update(f"{message.stage} ...")

    def on_loaded(self, message: Loaded) -> None:
        status = self.query_one("#chat-status", Static)
        if message.error:
            status.update(Text(message.error, "red"))
            return
        self.session = message.session
        status.update("the tuned model (base + adapter) is loaded; type a message below")
        self._ready()

    def _ready(self) -> None:
        self.query_one("#compare", Checkbox).disabled = False
        box = self.query_one("#chat-input", Input)
        box.disabled = False
        box.placeholder = "type a message"
        box.focus()

    # ------------------------------------------------------------ talking

    def comparing(self) -> bool:
        return self.query_one("#compare", Checkbox).value

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.session is None or self.generating:
            return
        event.input.value = ""
        event.input.disabled = True
        event.input.placeholder = "the model is answering ... (ctrl+l stops it and clears the chat)"
        self.query_one("#compare", Checkbox).disabled = True  # a turn's sides are fixed when it starts
        self.generating = True
        self._turn += 1
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(ChatMessage("you", text))
        sides = ["base", "tuned"] if self.comparing() else ["tuned"]
        answers = [ChatMessage(SIDES[s], side=s) for s in sides]
        if len(answers) == 2:
            transcript.mount(Horizontal(*answers, classes="chat-pair"))
        else:
            transcript.mount(answers[0])
        transcript.scroll_end(animate=False)
        self.generate(self._turn, text, [(s, a, self.histories[s]) for s, a in zip(sides, answers)])

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, turn: int, prompt: str, targets: list[tuple[str, ChatMessage, list]]) -> None:
        """One answer per side, one after the other (they share the model and the machine)."""
        worker = get_current_worker()

        for side, target, history in targets:
            def on_text(piece: str, target: ChatMessage = target) -> None:
                if worker.is_cancelled:
                    raise _Cancelled
                self.post_message(AnswerPiece(target, piece))

            messages = [*history, {"role": "user", "content": prompt}]
            try:
                answer = self.session.reply(messages, tuned=side == "tuned", on_text=on_text)
            except _Cancelled:
                return
            except (UserError, RuntimeError) as e:  # out of memory, for one: the chat goes on
                self.post_message(TurnDone(turn, target, f"could not answer: {str(e).splitlines()[0]}"))
                return
            self.post_message(Answered(history, prompt, answer))
        self.post_message(TurnDone(turn))

    def on_answer_piece(self, message: AnswerPiece) -> None:
        if not message.target.is_attached:  # cleared (ctrl+l) while the piece was on its way
            return
        message.target.append(message.piece)
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    def on_answered(self, message: Answered) -> None:
        message.history += [{"role": "user", "content": message.prompt},
                            {"role": "assistant", "content": message.answer}]

    def on_turn_done(self, message: TurnDone) -> None:
        if message.turn != self._turn:  # a turn abandoned by ctrl+l
            return
        if message.target is not None:
            message.target.fail(message.error)
        self.generating = False
        self._ready()

    # ------------------------------------------------------------ keys

    def action_toggle_compare(self) -> None:
        box = self.query_one("#compare", Checkbox)
        if not box.disabled:
            box.value = not box.value

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        """Both sides start a new conversation, so that both see the same messages."""
        if self.session is not None and not self.generating:
            self.query_one("#chat-input", Input).focus()  # after a click on the box: type on
        if not any(self.histories.values()):
            return
        self.histories = {"base": [], "tuned": []}
        what = "base and tuned model each answer" if event.value else "the tuned model answers"
        self.query_one("#transcript", VerticalScroll).mount(
            Static(f"— a new conversation: {what} —", classes="chat-divider dim"))

    def action_clear(self) -> None:
        """Forget the conversation (an answer being written is abandoned)."""
        self.workers.cancel_group(self, "generate")
        self._turn += 1
        self.histories = {"base": [], "tuned": []}
        self.query_one("#transcript", VerticalScroll).remove_children(".chat-msg, .chat-pair, .chat-divider")
        if self.session is not None:
            self.generating = False
            self._ready()

    def action_back(self) -> None:
        self.workers.cancel_group(self, "generate")
        self.dismiss()
