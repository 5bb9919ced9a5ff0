"""Training data: read a file, check every row, render it with the model's chat template and
mark which tokens are trained on.

    load_data(source, format=None, skip_bad_rows=False, method="sft") -> LoadedData (validated rows)
    chat_template_for(tokenizer) -> ChatTemplate                          (ChatML when none)
    tokenize(examples, tokenizer, template, train_on_inputs=False)        -> datasets.Dataset
    split_eval(examples, fraction, seed)                                  -> (train, eval)
    preference_dataset(examples)                  -> datasets.Dataset (prompt, chosen, rejected)
    tokenize_pairs(examples, tokenizer, "dpo")    -> the ids trl's DPOTrainer (or ORPOTrainer) trains

Sources: a `.jsonl`, `.json` (a list, or an object holding one), `.csv`, `.parquet` file, a
folder written by `datasets`' `save_to_disk`, or a Hugging Face dataset id (its data files
are downloaded into the Hugging Face cache by localtune.download, then read from there; offline,
a cached copy is used). The formats are defined in `localtune.formats`.

`method` says which formats the rows may be in: supervised rows for sft, preference pairs
(`PreferenceExample`) for dpo and orpo, any for None (to inspect a file). A file of the other
kind is one line naming the format found and the one needed.

Every row is checked before any training: malformed JSON, a missing field, a wrong type, an
empty assistant turn, an unknown role, a conversation that does not alternate, non-UTF-8
bytes, an empty file, several formats in one file; for a preference pair also chosen and
rejected that are the same, or conversations whose prompts (the turns before the last) differ.
Each problem names the file and line (or row index). By default loading stops with the first
10 problems and the total; with `skip_bad_rows` the bad rows are left out and counted. Duplicate rows are a warning. The
user's files are only ever read.

The tokenized dataset has `input_ids` and `assistant_masks` (1 = trained on), the columns
trl's SFTTrainer turns into labels. For a conversation the trained tokens are each assistant
turn's content and the end-of-turn token that closes it (`<|im_end|>` for ChatML), so the model
learns to stop. The mask comes from character spans in the rendered text mapped through the
fast tokenizer's offsets, so it works with any chat template that writes the message text
verbatim; trl's own `assistant_only_loss` needs templates with `{% generation %}` markers,
which most models' templates (SmolLM2's included) do not have.
"""

from __future__ import annotations

import csv
import io
import json
import operator
import os
import random
import statistics
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TypeVar

from localtune.errors import UserError
from localtune.formats import (CONVERSATION, FORMATS, PREFERENCE_CONVERSATION, PREFERENCE_METHODS,
                               PREFERENCE_TEXT, PROMPT_COMPLETION, ROLES, SHAREGPT_ROLES, SFT_METHODS, TEXT, detect,
                               formats_for, is_preference)

if TYPE_CHECKING:
    from localtune.download import Progress

MAX_PROBLEMS_SHOWN = 10
E = TypeVar("E")
DEMO = "demo"
"""The name that stands for the demo dataset shipped inside the package."""
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The template a model without one gets (the ChatML that SmolLM2, Qwen and others use)."""
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass
class Problem:
    """Something wrong with one row (or the whole file)."""

    where: str
    """'data.jsonl:12', 'data.json: row 3', or the file alone."""
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Example:
    """One valid row in its canonical shape (see localtune.formats)."""

    where: str
    shape: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    def key(self) -> str:
        """What two rows share when one duplicates the other."""
        return json.dumps([self.messages, self.prompt, self.completion, self.text], sort_keys=True)


Messages = list[dict[str, str]]


@dataclass
class PreferenceExample:
    """One valid preference pair in its canonical shape: trl's explicit-prompt form.

    PREFERENCE_CONVERSATION: `prompt` is every turn before the answer (a list of role/content
    messages, at least one user turn), `chosen` and `rejected` are the answer as a one-message
    list [{"role": "assistant", "content": ...}]. PREFERENCE_TEXT: all three are strings, as the
    user wrote them (trl concatenates prompt and answer and appends the EOS token)."""

    where: str
    shape: str
    prompt: Messages | str
    chosen: Messages | str
    rejected: Messages | str

    def key(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True)

    def row(self) -> dict[str, Any]:
        """The row trl's DPOTrainer and ORPOTrainer read."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class LoadedData:
    """Validated rows of one source, and what was left out or looked odd."""

    source: str
    format: str
    examples: list[Example] | list[PreferenceExample]
    """Example for a supervised format, PreferenceExample for a preference one."""
    total_rows: int
    skipped: list[Problem] = field(default_factory=list)
    """Bad rows left out (only with skip_bad_rows)."""
    warnings: list[str] = field(default_factory=list)
    duplicates: int = 0

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "methods": list(FORMATS[self.format].methods),
                "rows": self.total_rows,
                "valid_rows": len(self.examples), "skipped_rows": len(self.skipped),
                "skipped": [str(p) for p in self.skipped], "duplicates": self.duplicates,
                "warnings": list(self.warnings)}


class DataError(UserError):
    """The data has problems; the message lists up to ten of them and the count."""

    def __init__(self, source: str, problems: list[Problem], total_rows: int):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        n = len(problems)
        super().__init__(
            f"{source}: {n} problem{'s' * (n != 1)} in {total_rows} row{'s' * (total_rows != 1)}; "
            f"fix them, or pass --skip-bad-rows to leave those rows out:\n{shown}{more}")


# ---------------------------------------------------------------- reading rows


def _utf8_problem(name: str, raw: bytes, err: UnicodeDecodeError, line: int | None = None) -> Problem:
    if line is None:
        line = raw.count(b"\n", 0, err.start) + 1
    col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return Problem(f"{name}:{line}", f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {col}); "
                   "save the file as UTF-8")


def _rows_jsonl(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _utf8_problem(name, raw, e, lineno)
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, Problem(where, f"not valid JSON ({e.msg} at column {e.colno})")


def _read_text(path: Path, name: str) -> str | Problem:
    """The whole file as text (a UTF-8 byte-order mark is allowed), or where it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return _utf8_problem(name, raw, e)


def _rows_json(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path, name)
    if isinstance(text, Problem):
        yield name, text
        return
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        yield name, Problem(f"{name}:{e.lineno}", f"not valid JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if detect(data) is not None:
            data = [data]  # a single row
        elif len(lists) == 1:
            data = data[lists[0]]
        else:
            keys = ", ".join(lists) if lists else "none"
            yield name, Problem(name, f"expected a list of rows, or an object holding one list; "
                                f"lists found: {keys}")
            return
    if not isinstance(data, list):
        yield name, Problem(name, f"expected a list of rows, got {type(data).__name__}")
        return
    for i, row in enumerate(data, 1):
        yield f"{name}: row {i}", row


def _rows_csv(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path, name)
    if isinstance(text, Problem):
        yield name, text
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    line = 1
    for row in reader:
        where = f"{name}:{line + 1}"
        line = reader.line_num
        if None in row:
            yield where, Problem(where, f"{len(row[None])} more value(s) than the header's {len(reader.fieldnames or [])} columns")
            continue
        # conversation columns hold JSON text in a CSV cell
        for key in ("messages", "conversations"):
            if isinstance(row.get(key), str):
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as e:
                    yield where, Problem(where, f"'{key}' is not valid JSON ({e.msg})")
                    break
        else:
            yield where, row


def _rows_table(rows: list[dict[str, Any]], name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows, 1):
        yield f"{name}: row {i}", {k: v for k, v in row.items() if v is not None}


def _rows_parquet(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield name, Problem(name, f"not a readable Parquet file ({e})")
        return
    yield from _rows_table(table.to_pylist(), name)


def _rows_saved_dataset(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError variants
        yield name, Problem(name, f"not a folder written by datasets' save_to_disk ({e})")
        return
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            yield name, Problem(name, f"the saved DatasetDict has no 'train' split (it has {', '.join(ds)})")
            return
        ds = ds["train"]
    yield from _rows_table(ds.to_list(), name)


def _rows_hub(dataset_id: str, progress: Progress | None = None) -> Iterator[tuple[str, Any]]:
    """The train split of a hub dataset: its data files downloaded into the Hugging Face cache
    (localtune.download: the same checks, progress and resume as a model's weights), then read
    by `datasets` from that local folder, so nothing but the download touches the network."""
    import datasets

    from localtune.download import ensure
    from localtune.paths import cache_dir

    folder = ensure(dataset_id, "dataset", what="--data", progress=progress)
    try:
        ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(cache_dir() / "datasets"))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for files it cannot read
        raise UserError(f"--data {dataset_id}: cannot read the train split from its files in {folder} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    yield from _rows_table(ds.to_list(), dataset_id)


def fetch_hub_dataset(source: str | os.PathLike, progress: Progress) -> None:
    """Download `source`'s files first, reporting to `progress`, when it names a hub dataset
    (org/name) that is not a local file or folder; nothing otherwise. `load_data` then finds
    them in the cache. For a command that shows a progress bar while the data comes in."""
    source = resolve_source(source)
    if Path(source).expanduser().exists() or not _is_hub_id(str(source)):
        return
    from localtune.download import ensure

    ensure(str(source), "dataset", what="--data", progress=progress, every_s=0.1)


def _is_hub_id(s: str) -> bool:
    return not (s.startswith((".", "/", "~")) or s.lower().endswith(FILE_SUFFIXES) or s.count("/") != 1)


DEMO_PREFERENCE, DEMO_PREFERENCE_EVAL = "demo-preference", "demo-preference-eval"
DEMO_PREFERENCE_PARROT, DEMO_PREFERENCE_PARROT_EVAL = "demo-preference-parrot", "demo-preference-parrot-eval"


def resolve_source(source: str | os.PathLike) -> str | os.PathLike:
    """`demo` stands for the demo set shipped inside the package, `demo-preference` and
    `demo-preference-eval` for the preference demo's pairs and its held-out pairs (what
    `--method dpo` trains on with the demo data), `demo-preference-parrot` and
    `demo-preference-parrot-eval` for the same pairs in the SFT demo's voice (what it trains on
    when it continues a run of the SFT demo); anything else is itself."""
    from localtune import demo

    named = {DEMO: demo.demo_dataset_path, DEMO_PREFERENCE: demo.preference_dataset_path,
             DEMO_PREFERENCE_EVAL: demo.preference_eval_path,
             DEMO_PREFERENCE_PARROT: demo.parrot_preference_dataset_path,
             DEMO_PREFERENCE_PARROT_EVAL: demo.parrot_preference_eval_path}
    if str(source) in named:
        return named[str(source)]()
    return source


def read_rows(source: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of `source`; a row that cannot even be read is a Problem.
    `demo` names the demo set shipped with localtune."""
    source = resolve_source(source)
    path = Path(source).expanduser()
    name = str(source)
    if path.is_dir():
        return _rows_saved_dataset(path, name)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv, ".parquet": _rows_parquet}
        if suffix not in readers:
            raise UserError(f"{name}: unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}, "
                            "a save_to_disk folder or a Hugging Face dataset id")
        return readers[suffix](path, name)
    s = str(source)
    if not _is_hub_id(s):
        raise UserError(f"{name}: no such file or folder")
    return _rows_hub(s)


# ---------------------------------------------------------------- checking rows


def _text_field(row: dict[str, Any], key: str, *, allow_empty: bool = False, optional: bool = False) -> str | None:
    if key not in row:
        if optional:
            return None
        raise _RowError(f"missing '{key}'")
    v = row[key]
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise _RowError(f"'{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise _RowError(f"'{key}' is empty")
    return v


class _RowError(Exception):
    pass


def _check_turns(turns: list[tuple[str, str]], label: str, name: Any = None) -> list[dict[str, str]]:
    """Roles must be an optional system turn, then user/assistant alternating, ending with the
    assistant (the part that is trained on); assistant turns must not be empty. `name(i)` says
    where turn i came from (default: label[i])."""
    if not turns:
        raise _RowError(f"'{label}' is empty")
    name = name or (lambda i: f"{label}[{i}]")
    messages = [{"role": r, "content": c} for r, c in turns]
    start = 1 if turns[0][0] == "system" else 0
    if start == len(turns):
        raise _RowError("the conversation has only a system message")
    for i, (role, content) in enumerate(turns[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            what = ("a system message after the first turn" if role == "system"
                    else "an assistant turn before any user turn" if i == start
                    else f"a second '{role}' turn in a row")
            raise _RowError(f"{name(i)} is {what}; turns must alternate user/assistant after an optional system message")
        if role == "assistant" and not content.strip():
            raise _RowError(f"{name(i)} (assistant) is empty")
        if role == "user" and not content.strip():
            raise _RowError(f"{name(i)} (user) is empty")
    if turns[-1][0] != "assistant":
        raise _RowError(f"the last turn is '{turns[-1][0]}'; a conversation must end with an assistant turn to train on")
    return messages


def _turns(row: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[tuple[str, str]]:
    items = row[key]
    if not isinstance(items, list):
        raise _RowError(f"'{key}' must be a list of {{{role_key}, {text_key}}} objects, got {type(items).__name__}")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise _RowError(f"{key}[{i}] must be an object with '{role_key}' and '{text_key}', got {type(m).__name__}")
        for k in (role_key, text_key):
            if k not in m:
                raise _RowError(f"{key}[{i}] has no '{k}'")
        role, content = m[role_key], m[text_key]
        if not isinstance(role, str) or role not in roles:
            raise _RowError(f"{key}[{i}] has {role_key} {role!r}; expected one of {', '.join(dict.fromkeys(roles))}")
        if not isinstance(content, str):
            raise _RowError(f"{key}[{i}].{text_key} must be a string, got {type(content).__name__}")
        out.append((roles[role], content))
    return out


def _and(words: tuple[str, ...] | list[str], last: str = "and") -> str:
    return ", ".join(words[:-1]) + f" {last} " + words[-1] if len(words) > 1 else "".join(words)


def _preference_text(row: dict[str, Any], where: str) -> PreferenceExample:
    values = {}
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(row.get(key), list):
            raise _RowError(f"'{key}' must be a string, got list (chosen and rejected conversations are the "
                            "preference_messages format)")
        values[key] = _text_field(row, key)
    if values["chosen"].strip() == values["rejected"].strip():
        raise _RowError("'chosen' and 'rejected' are the same answer; a pair must differ to show a preference")
    return PreferenceExample(where, PREFERENCE_TEXT, values["prompt"], values["chosen"], values["rejected"])


def _preference_conversation(row: dict[str, Any], where: str) -> PreferenceExample:
    """Both conversations end with the assistant's answer; what comes before it (inside them, or
    in a separate prompt) is the prompt, which must be the same for both."""
    roles = {r: r for r in ROLES}
    answers = {}
    for key in ("chosen", "rejected"):
        answers[key] = _turns(row, key, "role", "content", roles)
        if not answers[key]:
            raise _RowError(f"'{key}' is empty")
    prompt: list[tuple[str, str]] = []
    prompt_name: Any = lambda i: f"prompt[{i}]"  # noqa: E731
    given = row.get("prompt")
    if isinstance(given, str):
        if not given.strip():
            raise _RowError("'prompt' is empty")
        # trl's reading of a string prompt beside conversations: they hold the prompt (as in
        # HuggingFaceH4/ultrafeedback_binarized); when they hold only the answer, it is the user turn
        if answers["chosen"][0][0] == "assistant" and answers["rejected"][0][0] == "assistant":
            prompt = [("user", given)]
            prompt_name = lambda i: "prompt"  # noqa: E731
    elif given is not None:
        prompt = _turns(row, "prompt", "role", "content", roles)
        if not prompt:
            raise _RowError("'prompt' is empty")
        for key, turns in answers.items():
            if turns[:len(prompt)] == prompt:
                raise _RowError(f"'{key}' repeats the prompt; beside a separate 'prompt', chosen and rejected hold "
                                "only the answer")
    full = {}
    for key, turns in answers.items():
        if turns[-1][0] != "assistant":
            raise _RowError(f"the last turn of '{key}' is '{turns[-1][0]}'; chosen and rejected must end with the "
                            "assistant's answer")
        n = len(prompt)
        full[key] = _check_turns(prompt + turns, key,
                                 lambda i, key=key, n=n: prompt_name(i) if i < n else f"{key}[{i - n}]")
    chosen, rejected = full["chosen"], full["rejected"]
    if chosen[:-1] != rejected[:-1]:
        if len(chosen) != len(rejected):
            diff = (f"'chosen' has {len(answers['chosen']) - 1} turns before its answer, 'rejected' "
                    f"{len(answers['rejected']) - 1}")
        else:
            i = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b) - len(prompt)
            diff = f"chosen[{i}] and rejected[{i}] differ"
        raise _RowError(f"{diff}; a pair shares its prompt (every turn before the last) and differs only in the "
                        "assistant's last answer")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise _RowError("'chosen' and 'rejected' end with the same answer; a pair must differ to show a preference")
    return PreferenceExample(where, PREFERENCE_CONVERSATION, chosen[:-1], chosen[-1:], rejected[-1:])


def to_example(row: Any, fmt: str, where: str) -> Example | PreferenceExample:
    """Check one row against `fmt` and return it in canonical shape; raise _RowError if bad."""
    if not isinstance(row, dict):
        raise _RowError(f"a row must be a JSON object, got {type(row).__name__}")
    spec = FORMATS[fmt]
    missing = [k for k in spec.required if k not in row]
    if missing:
        raise _RowError(f"missing '{missing[0]}' ({fmt} rows need {_and(spec.required)})")
    if fmt == "preference":
        return _preference_text(row, where)
    if fmt == "preference_messages":
        return _preference_conversation(row, where)
    if fmt == "messages":
        turns = _turns(row, "messages", "role", "content", {r: r for r in ROLES})
        return Example(where, CONVERSATION, messages=_check_turns(turns, "messages"))
    if fmt == "sharegpt":
        turns = _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
        system = _text_field(row, "system", optional=True, allow_empty=True)
        if system and (not turns or turns[0][0] != "system"):
            turns = [("system", system), *turns]
        return Example(where, CONVERSATION, messages=_check_turns(turns, "conversations"))
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", optional=True, allow_empty=True)
        output = _text_field(row, "output")
        system = _text_field(row, "system", optional=True, allow_empty=True)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = ([("system", system)] if system and system.strip() else []) + [("user", user), ("assistant", output)]
        return Example(where, CONVERSATION, messages=_check_turns(turns, "alpaca"))
    if fmt == "prompt_completion":
        return Example(where, PROMPT_COMPLETION, prompt=_text_field(row, "prompt", allow_empty=True),
                       completion=_text_field(row, "completion"))
    return Example(where, TEXT, text=_text_field(row, "text"))


def _kind(fmt: str) -> str:
    return "preference pairs, for --method dpo or orpo" if is_preference(fmt) else "supervised fine-tuning"


def _needed(method: str) -> str:
    """What `method` reads, in words, for the mismatch line."""
    if method in PREFERENCE_METHODS:
        return ("preference pairs (preference: prompt/chosen/rejected, or preference_messages: chosen/rejected "
                "conversations)")
    return f"supervised fine-tuning rows ({_and(formats_for(method), 'or')})"


class MethodMismatch(UserError):
    """The file holds rows for another training method: one line, the format found and the one needed."""

    def __init__(self, source: str, fmt: str, method: str, *, forced: bool = False):
        self.format, self.method = fmt, method
        if forced:
            what = "--method dpo or orpo" if is_preference(fmt) else "supervised fine-tuning"
            found = f"--format {fmt} is for {what}"
        else:
            found = f"these rows are {fmt} ({_kind(fmt)})"
        super().__init__(f"{source}: {found}; --method {method} needs {_needed(method)}; see localtune data formats")


def load_data(source: str | os.PathLike, *, format: str | None = None, skip_bad_rows: bool = False,
              method: str | None = "sft") -> LoadedData:
    """Read and check every row of `source`. Raises DataError listing the problems unless
    `skip_bad_rows`, in which case bad rows are left out and listed in `skipped`.

    `method` (sft, dpo or orpo) limits the formats to those it reads: the examples are Example
    for sft, PreferenceExample for dpo and orpo. A file (or a --format) for the other kind of
    method raises MethodMismatch, one line. None reads every format (inspecting a file)."""
    source = resolve_source(source)
    name = str(source)
    if format is not None and format not in FORMATS:
        raise UserError(f"--format {format!r}: unknown format; use one of {', '.join(FORMATS)}")
    if method is not None and method not in (*SFT_METHODS, *PREFERENCE_METHODS):
        known = ", ".join((*SFT_METHODS, *PREFERENCE_METHODS))
        raise UserError(f"--method {method!r}: unknown method; use one of {known}")
    allowed = formats_for(method)
    if format is not None and format not in allowed:
        raise MethodMismatch(name, format, method, forced=True)
    rows = list(read_rows(source))
    # a reader yields the problem under the source's bare name when the file as a whole is
    # unreadable (the Problem itself may still name a line: bad JSON or UTF-8 in a .json/.csv)
    fatal = [r for where, r in rows if isinstance(r, Problem) and where == name]
    if fatal:  # the file as a whole could not be read: nothing to skip around
        raise UserError(str(fatal[0]))
    if not rows:
        raise UserError(f"{name}: the file is empty (no rows); see `localtune data formats` for what a row looks like")

    chosen = format
    detected: dict[str, list[str]] = {}
    elsewhere: dict[str, list[str]] = {}
    """Rows in none of the method's formats but in another method's."""
    for where, row in rows:
        if not isinstance(row, Problem):
            f = detect(row, allowed)
            if f is not None:
                detected.setdefault(f, []).append(where)
            elif (other := detect(row)) is not None:
                elsewhere.setdefault(other, []).append(where)
    if chosen is None:
        if sum(map(len, elsewhere.values())) > sum(map(len, detected.values())):
            raise MethodMismatch(name, max(elsewhere, key=lambda f: len(elsewhere[f])), method)
        if not detected:
            if all(isinstance(r, Problem) for _, r in rows):  # nothing readable: show why
                raise DataError(name, [r for _, r in rows], len(rows))
            keys = sorted(rows[0][1]) if isinstance(rows[0][1], dict) else []
            raise UserError(f"{name}: no row is in a known format (first row's keys: {', '.join(keys) or 'none'}); "
                            f"expected one of: " + "; ".join(f"{f} ({', '.join(FORMATS[f].required)})" for f in allowed))
        chosen = max(detected, key=lambda f: len(detected[f]))

    problems: list[Problem] = []
    if len(detected) > 1 and format is None:
        others = ", ".join(f"{len(w)} {f} (first at {w[0]})" for f, w in detected.items() if f != chosen)
        problems.append(Problem(name, f"rows in several formats: {len(detected[chosen])} {chosen}, {others}; "
                                f"one file holds one format (or force one with --format)"))
    examples: list[Example | PreferenceExample] = []
    for where, row in rows:
        if isinstance(row, Problem):
            problems.append(row)
            continue
        f = detect(row, allowed) or detect(row)
        if format is None and f is not None and f != chosen:
            kind = f" ({_kind(f)})" if is_preference(f) != is_preference(chosen) else ""
            problems.append(Problem(where, f"this row is {f}{kind}, the file is {chosen}"))
            continue
        try:
            examples.append(to_example(row, chosen, where))
        except _RowError as e:
            problems.append(Problem(where, str(e)))

    total = len(rows)
    if problems and not skip_bad_rows:
        raise DataError(name, problems, total)
    row_problems = [p for p in problems if p.where != name]
    if not examples:
        raise DataError(name, problems or [Problem(name, "no valid rows")], total)

    seen: dict[str, str] = {}
    duplicates = 0
    first_dup = None
    for ex in examples:
        k = ex.key()
        if k in seen:
            duplicates += 1
            first_dup = first_dup or f"{ex.where} repeats {seen[k]}"
        else:
            seen[k] = ex.where
    warnings = []
    if duplicates:
        warnings.append(f"{duplicates} duplicate row{'s' * (duplicates != 1)} (first: {first_dup}); they are kept")
    if row_problems:
        warnings.append(f"{len(row_problems)} bad row{'s' * (len(row_problems) != 1)} left out (--skip-bad-rows)")
    return LoadedData(name, chosen, examples, total, skipped=row_problems, warnings=warnings, duplicates=duplicates)


def split_eval(examples: list[E], fraction: float, seed: int) -> tuple[list[E], list[E]]:
    """Hold out `fraction` of the rows for evaluation: the same rows for the same seed. Works
    alike on Example and PreferenceExample lists (a pair is held out whole)."""
    if not 0 < fraction < 1:
        raise UserError(f"--eval-split must be between 0 and 1 (e.g. 0.05), got {fraction:g}")
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise UserError(f"--eval-split {fraction:g} leaves no training rows out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


# ---------------------------------------------------------------- chat template and tokens


@dataclass
class ChatTemplate:
    """The chat template a run renders with, recorded so chat and export use the same one."""

    template: str
    source: str
    """'model' (the tokenizer's own) or 'chatml' (added: the model had none)."""
    end_of_turn: str
    """The text that closes an assistant turn and is trained on with it ('<|im_end|>')."""
    added_tokens: list[str] = field(default_factory=list)
    """Special tokens added to the tokenizer for the template (the embeddings must grow)."""
    assistant_prefix: str = ""
    """What the template writes between a user turn's text and the reply that follows it
    ('<|im_end|>\n<|im_start|>assistant\n' for ChatML). Each reply is searched for with this in
    front, so a short reply ('a', 'end') is not mistaken for part of the template's own text."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def chat_template_for(tokenizer: Any) -> ChatTemplate:
    """The tokenizer's chat template, or ChatML with its special tokens added (and the tokenizer
    changed to match) when the model has none: a base model."""
    added: list[str] = []
    source = "model"
    if not getattr(tokenizer, "chat_template", None):
        vocab = tokenizer.get_vocab()
        added = [t for t in CHATML_TOKENS if t not in vocab]
        if added:
            # transformers 5 names them extra_special_tokens (the v4 keyword is gone)
            tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
        tokenizer.chat_template = CHATML_TEMPLATE
        source = "chatml"
    sentinel, user_sentinel = "\u2063LOCALTUNE\u2063", "\u2063USER\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_sentinel}, {"role": "assistant", "content": sentinel}], tokenize=False)
    user_end = rendered.find(user_sentinel) + len(user_sentinel)
    prefix = rendered[user_end:rendered.index(sentinel)] if user_end >= len(user_sentinel) else ""
    suffix = rendered[rendered.index(sentinel) + len(sentinel):]
    specials = sorted({*tokenizer.all_special_tokens, *getattr(tokenizer, "added_tokens_encoder", {})}, key=len, reverse=True)
    end = ""
    hits = [(suffix.find(s), s) for s in specials if s and s in suffix]
    if hits:
        pos, tok = min(hits)
        end = suffix[:pos + len(tok)]
    elif suffix.strip():
        end = suffix.rstrip()
    return ChatTemplate(template=tokenizer.chat_template, source=source, end_of_turn=end, added_tokens=added,
                        assistant_prefix=prefix)


def _conversation_spans(messages: list[dict[str, str]], text: str, end_of_turn: str,
                        assistant_prefix: str = "") -> list[tuple[int, int]] | None:
    """Character spans of each assistant turn (content + end of turn) in the rendered text,
    found by walking the messages in order; None if the template rewrote a message."""
    spans = []
    pos = 0
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant" and assistant_prefix:
            # a reply always follows a user turn (checked when loading): anchor it on the
            # template's text in between, which a bare find could match instead ('a' in 'assistant')
            at = text.find(assistant_prefix + content, pos)
            if at < 0:
                return None
            at += len(assistant_prefix)
        else:
            at = text.find(content, pos)
        if at < 0:
            return None
        end = at + len(content)
        if m["role"] == "assistant":
            if end_of_turn and text.startswith(end_of_turn, end):
                end += len(end_of_turn)
            spans.append((at, end))
        pos = end
    return spans


def _prefix_spans(messages: list[dict[str, str]], tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Slower fallback: render growing prefixes and diff them."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, min(end, len(text))))
    return spans


def _conversation_trained(messages: list[dict[str, str]], text: str, tokenizer: Any, template: ChatTemplate,
                          train_on_inputs: bool) -> list[tuple[int, int]]:
    if train_on_inputs:
        return [(0, len(text))]
    spans = _conversation_spans(messages, text, template.end_of_turn, template.assistant_prefix)
    return spans if spans is not None else _prefix_spans(messages, tokenizer, text)


def _render_plain(shape: str, prompt: str | None, completion: str | None, text: str | None, eos: str,
                  train_on_inputs: bool) -> tuple[str, list[tuple[int, int]]]:
    """A prompt/completion or text row: (text, trained character spans)."""
    if shape == PROMPT_COMPLETION:
        out = prompt + completion + eos
        return out, [(0 if train_on_inputs else len(prompt), len(out))]
    out = text + eos
    return out, [(0, len(out))]


def render(example: Example, tokenizer: Any, template: ChatTemplate, train_on_inputs: bool = False) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, trained character spans, add_special_tokens) for one example."""
    if example.shape == CONVERSATION:
        text = tokenizer.apply_chat_template(example.messages, tokenize=False)
        return text, _conversation_trained(example.messages, text, tokenizer, template, train_on_inputs), False
    text, spans = _render_plain(example.shape, example.prompt, example.completion, example.text,
                                tokenizer.eos_token or "", train_on_inputs)
    return text, spans, True


def _trained_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], whole: bool) -> list[int]:
    """1 for each token whose text starts inside a trained span. A token with no text of its
    own (an added BOS) is trained only when all of the text is."""
    if whole:
        return [1] * len(offsets)
    if not offsets:
        return []
    starts, ends = zip(*offsets)
    if any(map(operator.eq, starts, ends)) or not all(map(operator.le, starts, starts[1:])):
        return [0 if s == e else int(any(a <= s < b for a, b in spans)) for s, e in offsets]
    # the usual case (every token has text, in order): two binary searches per span instead of
    # a Python test per token, which cost as much as the Rust tokenizer itself
    mask = [0] * len(offsets)
    for a, b in spans:
        i, j = bisect_left(starts, a), bisect_left(starts, b)
        mask[i:j] = [1] * (j - i)
    return mask


def _encode(texts: list[str], tokenizer: Any, add_special: bool) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """input_ids and character offsets of each text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        # the Rust call that tokenizer(...) makes, without building a BatchEncoding (~15% of the time)
        encodings = backend.encode_batch(texts, add_special_tokens=add_special)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, template: ChatTemplate, train_on_inputs: bool) -> dict[str, list]:
    shapes = batch["shape"]
    texts: list[str] = [""] * len(shapes)
    spans_all: list[list[tuple[int, int]]] = [[]] * len(shapes)
    conversations = [i for i, shape in enumerate(shapes) if shape == CONVERSATION]
    if conversations:
        # one call for the whole batch: the template's per-call set-up is paid once
        rendered = tokenizer.apply_chat_template([batch["messages"][i] for i in conversations], tokenize=False)
        for i, text in zip(conversations, rendered):
            texts[i] = text
            spans_all[i] = _conversation_trained(batch["messages"][i], text, tokenizer, template, train_on_inputs)
    eos = tokenizer.eos_token or ""
    for i, shape in enumerate(shapes):
        if shape != CONVERSATION:
            texts[i], spans_all[i] = _render_plain(shape, batch["prompt"][i], batch["completion"][i], batch["text"][i],
                                                   eos, train_on_inputs)
    # one file holds one format, so one setting serves the batch: a chat template writes its own
    # special tokens, plain text gets the tokenizer's (a BOS, for Llama)
    add_special = bool(shapes) and shapes[-1] != CONVERSATION
    input_ids, offsets = _encode(texts, tokenizer, add_special)
    masks = [_trained_mask(o, spans, spans == [(0, len(text))]) for text, o, spans in zip(texts, offsets, spans_all)]
    return {"input_ids": input_ids, "assistant_masks": masks, "length": [len(x) for x in input_ids]}


def _as_columns(examples: list[Example]) -> dict[str, list]:
    return {
        "shape": [e.shape for e in examples],
        "messages": [e.messages for e in examples],
        "prompt": [e.prompt for e in examples],
        "completion": [e.completion for e in examples],
        "text": [e.text for e in examples],
    }


def tokenize(examples: list[Example], tokenizer: Any, template: ChatTemplate, *, train_on_inputs: bool = False,
             num_proc: int | None = None, batch_size: int = 1000):
    """Render and tokenize every example (batched, in parallel over the CPU cores for large
    sets): a datasets.Dataset with input_ids, assistant_masks (1 = trained on) and length."""
    import datasets

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("this model's tokenizer has no fast (Rust) version, which localtune needs to map "
                        "the trained text to tokens")
    if any(isinstance(e, PreferenceExample) for e in examples):
        raise TypeError("tokenize() is for supervised rows; preference pairs go through preference_dataset()")
    large = len(examples) >= 20_000  # below this, worker start-up costs more than it saves
    ds = datasets.Dataset.from_dict(_as_columns(examples))
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if large else None
    bars = datasets.is_progress_bar_enabled()
    if not large:
        datasets.disable_progress_bars()
    try:
        return ds.map(_tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                      remove_columns=ds.column_names,
                      fn_kwargs={"tokenizer": tokenizer, "template": template, "train_on_inputs": train_on_inputs},
                      desc="Rendering and tokenizing")
    finally:
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- preference pairs (dpo, orpo)


def preference_dataset(examples: list[PreferenceExample]):
    """The pairs as the datasets.Dataset trl's DPOTrainer and ORPOTrainer take: columns `prompt`,
    `chosen` and `rejected`, in trl's explicit-prompt form. Conversations stay conversations
    (lists of {"role", "content"}: the prompt turns, and the one assistant answer), so trl renders
    them with the tokenizer's chat template; plain strings stay strings (trl concatenates prompt
    and answer and ends the answer with the EOS token).

    The worker calls it as

        loaded = load_data(data, format=fmt, skip_bad_rows=skip, method=knobs.method)  # dpo / orpo
        train, held = split_eval(loaded.examples, eval_split, knobs.seed)   # or load_data(eval_data, ...)
        template = chat_template_for(tokenizer)   # sets the template on the tokenizer (ChatML if none)
        DPOTrainer(model, args=DPOConfig(...), train_dataset=preference_dataset(train),
                   eval_dataset=preference_dataset(held), processing_class=tokenizer)

    with the tokenizer that chat_template_for has seen, so the pairs are rendered with the same
    template as SFT rows and as `localtune data inspect` shows them (see tokenize_pairs). The
    rows keep their order; a file holds one shape, and mixing shapes here is refused."""
    import datasets

    if not examples:
        raise ValueError("preference_dataset() needs at least one pair")
    if not all(isinstance(e, PreferenceExample) for e in examples):
        raise TypeError("preference_dataset() takes PreferenceExample rows: load_data(..., method='dpo' or 'orpo')")
    shapes = {e.shape for e in examples}
    if len(shapes) > 1:
        raise ValueError(f"preference pairs of several shapes ({', '.join(sorted(shapes))}): one dataset holds one")
    return datasets.Dataset.from_dict({"prompt": [e.prompt for e in examples],
                                       "chosen": [e.chosen for e in examples],
                                       "rejected": [e.rejected for e in examples]})


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _end_at_eos(answer: str, eos: str) -> str:
    """An answer rendered by a chat template ends with its end-of-turn and a newline
    ('Paris.<|im_end|>\n'); when the end-of-turn is the EOS token, the answer ends there."""
    trimmed = answer.rstrip()
    return trimmed if eos and trimmed.endswith(eos) else answer


def orpo_dataset(examples: list[PreferenceExample], tokenizer: Any):
    """The pairs as ORPO trains them. trl 1.16's ORPOTrainer renders conversations with the chat
    template and then appends the EOS token to an answer that does not end with it, so with a
    template that closes a turn with '<|im_end|>\n' it trained '...<|im_end|>\n<|im_end|>': a
    second end of turn the model never sees at inference. Here conversations are rendered with
    the same template into strings whose answers end at the end-of-turn when it is the EOS
    token ('Paris.<|im_end|>'), so trl adds nothing; string pairs are given as they are.
    `tokenize_pairs(..., "orpo")` shows the same tokens."""
    import datasets

    if examples and examples[0].shape == PREFERENCE_CONVERSATION:
        rows = [_orpo_texts(e, tokenizer) for e in examples]
        return datasets.Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                                           "rejected": [r[2] for r in rows]})
    return preference_dataset(examples)


def _orpo_texts(e: PreferenceExample, tokenizer: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a conversation pair rendered as ORPO trains it."""
    p = tokenizer.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True)
    c = tokenizer.apply_chat_template(e.prompt + e.chosen, tokenize=False)
    r = tokenizer.apply_chat_template(e.prompt + e.rejected, tokenize=False)
    n = min(_common_prefix_length(p, c), _common_prefix_length(p, r))
    eos = tokenizer.eos_token or ""
    return p[:n], _end_at_eos(c[n:], eos), _end_at_eos(r[n:], eos)


def _orpo_ids(prompt: str, chosen: str, rejected: str, tokenizer: Any) -> dict[str, list[int]]:
    """trl 1.16 ORPOTrainer.tokenize_row (decoder-only) on the rendered texts."""
    def enc(text: str) -> list[int]:
        return list(_encode([text], tokenizer, False)[0][0])

    prompt_ids = enc(prompt)

    def split(answer: str) -> tuple[list[int], list[int]]:  # build_tokenized_answer
        full = enc(prompt + answer)
        start = len(prompt_ids)
        if prompt_ids != full[:start]:
            start -= 1
        return full[:start], full[start:]

    (cp, ca), (rp, ra) = split(chosen), split(rejected)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        cp = cp if cp and cp[0] == bos else [bos, *cp]
        rp = rp if rp and rp[0] == bos else [bos, *rp]
    ca = ca if ca and ca[-1] == eos else [*ca, eos]
    ra = ra if ra and ra[-1] == eos else [*ra, eos]
    # the sequences trl trains are cp + ca and rp + ra (labels from the end of cp, rp); cp and rp
    # differ only when a token merges across the boundary: show their common part as the prompt
    n = _common_prefix_length(cp, rp)
    return {"prompt_ids": cp[:n], "chosen_ids": (cp + ca)[n:], "rejected_ids": (rp + ra)[n:]}


def tokenize_pairs(examples: list[PreferenceExample], tokenizer: Any, method: str = "dpo",
                   batch_size: int = 500) -> list[dict[str, list[int]]]:
    """For each pair, the token ids trl 1.16 trains: {"prompt_ids", "chosen_ids", "rejected_ids"};
    the prompt is context, each answer the completion that is scored.

    dpo (DPOTrainer `_prepare_dataset`: add_eos and tokenize_fn). Conversations: the prompt
    rendered with the chat template and its generation prompt, and the prompt followed by each
    answer rendered whole (the template's own special tokens, none added). Strings: the answer
    gets the EOS token unless it ends with it, and the tokenizer adds its special tokens (a BOS,
    for Llama). The prompt is the tokens the prompt alone shares with both prompt+answer
    sequences (trl's common-prefix rule: a template that renders the prompt differently alone,
    or a token merging across the boundary, moves the cut), and each answer is the rest.

    orpo (trl.experimental.orpo ORPOTrainer's tokenize_row on `orpo_dataset`'s rows).
    Conversations are rendered to text first (the prompt is the characters the three renderings
    share; each answer ends at the template's end-of-turn when that is the EOS token); texts are
    tokenized without special tokens, the tokenizer's BOS is put before a prompt that does not
    start with it and its EOS token after an answer that does not end with it.

    Render with the tokenizer chat_template_for has set up."""
    if method not in PREFERENCE_METHODS:
        raise ValueError(f"tokenize_pairs: method must be one of {', '.join(PREFERENCE_METHODS)}, got {method!r}")
    out: list[dict[str, list[int]]] = []
    eos = tokenizer.eos_token or ""
    batches: list[list[PreferenceExample]] = []
    for e in examples:  # runs of one shape, at most batch_size long
        if not batches or len(batches[-1]) == batch_size or batches[-1][0].shape != e.shape:
            batches.append([])
        batches[-1].append(e)
    for batch in batches:
        conversation = batch[0].shape == PREFERENCE_CONVERSATION
        if conversation:
            prompts = tokenizer.apply_chat_template([e.prompt for e in batch], tokenize=False,
                                                    add_generation_prompt=True)
            with_chosen = tokenizer.apply_chat_template([e.prompt + e.chosen for e in batch], tokenize=False)
            with_rejected = tokenizer.apply_chat_template([e.prompt + e.rejected for e in batch], tokenize=False)
        else:
            prompts = [e.prompt for e in batch]
            if method == "orpo":
                with_chosen = [e.prompt + e.chosen for e in batch]
                with_rejected = [e.prompt + e.rejected for e in batch]
            else:
                with_chosen = [e.prompt + (e.chosen if e.chosen.endswith(eos) else e.chosen + eos) for e in batch]
                with_rejected = [e.prompt + (e.rejected if e.rejected.endswith(eos) else e.rejected + eos)
                                 for e in batch]
        if method == "orpo":
            for e, p, c, r in zip(batch, prompts, with_chosen, with_rejected):
                if conversation:  # as orpo_dataset renders them
                    out.append(_orpo_ids(*_orpo_texts(e, tokenizer), tokenizer))
                else:
                    out.append(_orpo_ids(p, c[len(p):], r[len(p):], tokenizer))
            continue
        # apply_chat_template(tokenize=True) encodes without special tokens; a plain string with them
        add_special = not conversation
        p_ids, _ = _encode(list(prompts), tokenizer, add_special)
        c_ids, _ = _encode(list(with_chosen), tokenizer, add_special)
        r_ids, _ = _encode(list(with_rejected), tokenizer, add_special)
        for p, c, r in zip(p_ids, c_ids, r_ids):
            n = min(_common_prefix_length(p, c), _common_prefix_length(p, r))
            out.append({"prompt_ids": list(p[:n]), "chosen_ids": list(c[n:]), "rejected_ids": list(r[n:])})
    return out


def pair_texts(tokens: dict[str, list[int]], tokenizer: Any) -> dict[str, str]:
    """The text of a pair's prompt, chosen and rejected tokens (tokenize_pairs), each answer as
    it reads after the prompt."""
    prompt = tokenizer.decode(tokens["prompt_ids"], skip_special_tokens=False)
    out = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        whole = tokenizer.decode(tokens["prompt_ids"] + tokens[f"{key}_ids"], skip_special_tokens=False)
        out[key] = (whole[len(prompt):] if whole.startswith(prompt)
                    else tokenizer.decode(tokens[f"{key}_ids"], skip_special_tokens=False))
    return out


def length_stats(lengths: list[int], max_length: int) -> dict[str, Any]:
    """min / median / p95 / max token lengths and how many rows exceed max_length, by how much."""
    s = sorted(lengths)
    over = [n - max_length for n in s if n > max_length]
    return {
        "min": s[0], "median": statistics.median(s), "p95": s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))],
        "max": s[-1], "max_length": max_length, "rows_over_max_length": len(over),
        "max_excess_tokens": max(over) if over else 0,
        "median_excess_tokens": statistics.median(over) if over else 0,
    }
