"""The `localtune` command: each subcommand is a plain function over the core modules.

    localtune probe [--json]                      what this machine has
    localtune profiles                            the shipped hardware profiles
    localtune plan [--model M] [--set k=v ...]    the knobs that fit, and why

A user's mistake (`UserError`) prints one line and exits 1. Anything else is a bug of ours:
the traceback goes to stderr and to a log file whose path is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from localtune import __version__
from localtune.errors import UserError
from localtune.knobs import METHODS

GiB = 1024**3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 1 like every other mistake."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- probe


def cmd_probe(args: argparse.Namespace) -> int:
    from localtune.engines import engine_line
    from localtune.hardware import describe, probe
    from localtune.profiles import match_profile

    hw = probe()
    profile = match_profile(hw)
    if args.json:
        _print_json({**hw.to_dict(), "profile": profile.name})
        return 0
    for line in describe(hw):
        print(line)
    print(f"Profile: {profile.name} ({profile.description})")
    print(f"Engine: {engine_line(profile.knobs.engine, hw.versions)}")
    return 0


# ---------------------------------------------------------------- profiles


def cmd_profiles(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from localtune.profiles import load_profiles

    profiles = load_profiles()
    if args.json:
        _print_json([{"name": p.name, "description": p.description, "backend": p.backend,
                      "min_memory_gb": p.min_memory_gb, "max_memory_gb": p.max_memory_gb,
                      "knobs": p.knobs.to_dict(), "path": str(p.path)} for p in profiles])
        return 0
    t = Table(box=None, pad_edge=False)
    for col in ("profile", "memory", "r", "batch", "accum", "max_length", "4-bit", "ckpt", "optim"):
        t.add_column(col)
    for p in profiles:
        k = p.knobs
        t.add_row(p.name, p.range_text, str(k.r), str(k.per_device_train_batch_size),
                  str(k.gradient_accumulation_steps), str(k.max_length), "yes" if k.load_in_4bit else "no",
                  "yes" if k.gradient_checkpointing else "no", k.optim)
    Console().print(t)
    return 0


# ---------------------------------------------------------------- plan


def _pinned_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from localtune.knobs import check_knob, parse_set_options

    pinned = parse_set_options(args.set or [])
    if args.max_seq_len is not None:
        pinned["max_length"] = check_knob("max_length", args.max_seq_len, "--max-seq-len")
    return pinned


def build_plan(args: argparse.Namespace):
    """The plan for `args` (shared by `plan` and, later, `train`)."""
    from localtune.hardware import probe
    from localtune.models import resolve_model
    from localtune.plan import hypothetical_hardware, make_plan

    pinned = _pinned_from_args(args)
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise UserError(f"--budget: {args.budget!r} is not a memory size; give a positive number of GB, e.g. 24")
    if args.budget is not None or args.backend is not None:
        if args.budget is None or args.backend is None:
            raise UserError("--budget and --backend go together: e.g. --budget 24 --backend cuda")
        # --gpus N with --budget: a machine with N such cards
        cards = int(args.gpus) if args.backend == "cuda" and (args.gpus or "").strip().isdigit() else 1
        hw = hypothetical_hardware(args.backend, args.budget, cards=max(1, min(cards, 64)))
    else:
        hw = probe()
    model = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    return make_plan(hw, model, profile=args.profile, pinned=pinned, gpus=args.gpus, processes=args.processes,
                     nodes=args.nodes)


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from localtune.memory import PART_LABELS

    con = Console(highlight=False)
    hw, dev, shape = plan.hardware, plan.budget_device, plan.model.shape
    par = plan.parallel
    cards = f"{len(plan.devices)} x " if len(plan.devices) > 1 else ""
    con.print(f"[bold]Machine[/]  {hw.backend} · {cards}{dev.name} · {dev.total_bytes / GiB:.1f} GB total, "
              f"{dev.free_bytes / GiB:.1f} GB free", soft_wrap=True)
    mode = {"single": "one device", "ddp": "data parallel (DDP)", "fsdp": "sharded (FSDP, QLoRA)"}[par.mode]
    ranks = f", {par.world_size} ranks" if par.world_size > 1 else ""
    con.print(f"[bold]Parallel[/] {mode}{ranks}: {par.reason}", soft_wrap=True)
    con.print(f"[bold]Profile[/]  {plan.profile.name}: {plan.profile.description}", soft_wrap=True)
    con.print(f"[bold]Model[/]    {plan.model.display_name} ({shape.model_type}, "
              f"{plan.estimate.base_params / 1e9:.2f}B params, {shape.num_hidden_layers} layers, "
              f"hidden {shape.hidden_size}, vocab {shape.vocab_size})", soft_wrap=True)
    if plan.adjustments:
        con.print("\n[bold]Adjustments[/] (in the planner's order)")
        for a in plan.adjustments:
            con.print(f"  {a.knob}: {_fmt_value(a.old)} → {_fmt_value(a.new)}  [dim]{a.reason}[/]", soft_wrap=True)
    sources = plan.knob_sources()
    t = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    t.add_column("knob", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_column("from")
    from localtune.knobs import METHOD_ONLY_KNOBS

    for k, v in plan.knobs.to_dict().items():
        if plan.knobs.method not in METHOD_ONLY_KNOBS.get(k, (plan.knobs.method,)):
            continue  # beta, loss_type, rpo_alpha mean nothing to an sft run
        src = sources[k]
        t.add_row(k, _fmt_value(v), "planner (above)" if src.startswith("planner") else src)
    con.print()
    con.print(t)
    e = plan.estimate
    con.print(f"\n[bold]Memory estimate[/] ({e.tokens_per_micro_batch} tokens per micro-batch)")
    for note in plan.notes:
        con.print(f"[dim]{note}[/]", soft_wrap=True)
    width = 30
    scale = max(e.total_bytes, plan.budget_bytes, 1)
    m = Table(box=None, pad_edge=False)
    m.add_column("part")
    m.add_column("GB", justify="right")
    m.add_column("")
    for name, b in e.parts():
        m.add_row(PART_LABELS[name], f"{b / GiB:.2f}", "█" * max(0, round(width * b / scale)))
    m.add_row("total", f"{e.total_bytes / GiB:.2f}", "")
    per = "per card" if hw.backend == "cuda" else ("per process" if par.processes > 1 else "")
    share = f" ÷ {par.processes} processes" if hw.backend != "cuda" and par.processes > 1 else ""
    which = f"GPU {dev.index}: " if hw.backend == "cuda" and len(plan.devices) > 1 else ""
    m.add_row(f"budget {per}".strip(), f"{plan.budget_bytes / GiB:.2f}",
              f"[dim]{which}(free {dev.free_bytes / GiB:.1f} GB − headroom {plan.headroom_bytes / GiB:.1f} GB){share}[/]"
              if share else f"[dim]{which}free {dev.free_bytes / GiB:.1f} GB − headroom {plan.headroom_bytes / GiB:.1f} GB[/]")
    con.print(m)
    if par.world_size > 1:
        k = plan.knobs
        con.print(f"effective batch {plan.effective_batch_size} = micro-batch {k.per_device_train_batch_size} x "
                  f"accumulation {k.gradient_accumulation_steps} x {par.world_size} ranks", soft_wrap=True)
    if plan.fits:
        con.print(Text(f"\nFits: {e.total_bytes / GiB:.1f} GB of {plan.budget_bytes / GiB:.1f} GB"
                       f"{' ' + per if per else ''}.", style="green"))
    else:
        con.print(Text(f"\nDoes not fit: the smallest configuration needs {e.total_bytes / GiB:.1f} GB, "
                       f"the budget is {plan.budget_bytes / GiB:.1f} GB{' ' + per if per else ''}. What would fit:",
                       style="red"))
        for a in plan.advice:
            con.print(f"  - {a}", soft_wrap=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from localtune.plan import max_context

    plan = build_plan(args)
    if args.calibrate and args.budget is not None:
        raise UserError("--calibrate measures this machine: leave out --budget and --backend")
    context = max_context(plan) if args.max_context else None
    calibration = _calibrate_plan(plan, quiet=args.json) if args.calibrate else None
    if args.json:
        _print_json({**plan.to_dict(), **({"max_context": context.to_dict()} if context else {}),
                     **({"calibration": calibration} if calibration else {})})
    else:
        from rich.console import Console

        render_plan(plan)
        con = Console(highlight=False)
        if context:
            con.print(f"\n[bold]Longest context[/] {context.line().split(': ', 1)[1]}", soft_wrap=True)
        if calibration:
            m = calibration["measured"]
            con.print(f"\n[bold]Calibration[/] {m['micro_batch']} x {m['max_length']} tokens on this device in "
                      f"{m['seconds']:.0f} s ({m['how']}): {calibration['note']}", soft_wrap=True)
            for part, v in calibration["by_part"].items():
                con.print(f"  {part:9s} estimate {v['estimate'] / GiB:6.2f} GB   measured {v['measured'] / GiB:6.2f} GB")
    return 0 if plan.fits else 1


def _calibrate_plan(plan, quiet: bool = False) -> dict:
    """`plan --calibrate`: measure the plan on this device in a throw-away run folder (the
    worker's calibration, without training) and say what the worker would do."""
    import shutil
    import tempfile

    from pathlib import Path

    from localtune.calibrate import decide, record, run_measurement, supported
    from localtune.events import atomic_write_json
    from localtune.launch import default_run_config
    from localtune.precision import DeviceFacts
    from localtune.runs import RunDir

    why = supported(plan.knobs)
    if why:
        raise UserError(f"--calibrate: {why}")
    model = plan.model.location if plan.model.kind in ("folder", "gguf") else plan.model.spec
    tmp = Path(tempfile.mkdtemp(prefix="localtune-calibrate-"))
    run = RunDir(tmp / "run")
    run.path.mkdir()
    run.write_config({"run": default_run_config(model=model), "knobs": plan.knobs.to_dict()})
    atomic_write_json(run.plan_path, plan.to_dict())
    if not quiet:
        print(f"calibrating: one training step of micro-batch {plan.knobs.per_device_train_batch_size} x "
              f"{plan.knobs.max_length} tokens on this device (a minute or so)...", file=sys.stderr, flush=True)
    m = run_measurement(run.path)  # UserError (naming the log, kept) when it fails
    shutil.rmtree(tmp, ignore_errors=True)
    e = plan.estimate
    d = decide(m, plan.knobs, plan.model.shape, DeviceFacts.from_hardware(plan.hardware), plan.budget_bytes,
               e.total_bytes, auto_batch=plan.knobs.auto_batch, reference_adapter=plan.reference_adapter)
    changed = {k: v for k, v in d.knobs.to_dict().items() if plan.knobs.to_dict()[k] != v}
    return record(m, d, e.to_dict(), plan.budget_bytes, changed)


# ---------------------------------------------------------------- data


def _marked_example(text: str, spans: list[tuple[int, int]]):
    """The rendered text with the trained parts in green between « and »."""
    from rich.text import Text

    out = Text()
    pos = 0
    for a, b in spans:
        out.append(text[pos:a], style="dim")
        out.append("«" + text[a:b] + "»", style="bold green")
        pos = b
    out.append(text[pos:], style="dim")
    return out


def _inspect_header(con, args: argparse.Namespace, loaded, model, template) -> None:
    """The lines `data inspect` shows for every kind of file: the source, format, rows, problems."""
    how = "forced with --format" if args.format else "detected"
    con.print(f"[bold]Data[/]      {loaded.source}", soft_wrap=True)
    con.print(f"[bold]Format[/]    {loaded.format} ({how})")
    con.print(f"[bold]Rows[/]      {loaded.total_rows} ({len(loaded.examples)} valid, {len(loaded.skipped)} bad)")
    for p in loaded.skipped[:10]:
        con.print(f"  [red]{p}[/]", soft_wrap=True)
    if len(loaded.skipped) > 10:
        con.print(f"  ... and {len(loaded.skipped) - 10} more")
    for w in loaded.warnings:
        if "left out" not in w:
            con.print(f"[yellow]Warning[/]   {w}", soft_wrap=True)
    tmpl = "the model's own" if template.source == "model" else "ChatML (the model has none; tokens added: " + (", ".join(template.added_tokens) or "none") + ")"
    con.print(f"[bold]Model[/]     {model.display_name}; chat template: {tmpl}", soft_wrap=True)


def _inspect_footer(con, loaded, bad: bool) -> int:
    if bad:
        con.print(f"\n[red]Training would stop on the {len(loaded.skipped)} bad rows: fix them, "
                  "or pass --skip-bad-rows to leave them out.[/]", soft_wrap=True)
        return 1
    return 0


def _inspect_pairs(args: argparse.Namespace, loaded, model, tokenizer, template, max_length: int) -> int:
    """`data inspect` of preference pairs: the tokens trl's DPOTrainer (or ORPOTrainer, with
    --method orpo) trains, per pair the prompt and the two answers."""
    from rich.console import Console
    from rich.text import Text

    from localtune.data import length_stats, pair_texts, tokenize_pairs

    method = args.method if args.method in ("dpo", "orpo") else "dpo"
    trainer = "DPOTrainer" if method == "dpo" else "ORPOTrainer"
    pairs = tokenize_pairs(loaded.examples, tokenizer, method)
    n_prompt = [len(t["prompt_ids"]) for t in pairs]
    n_chosen = [len(t["chosen_ids"]) for t in pairs]
    n_rejected = [len(t["rejected_ids"]) for t in pairs]
    longest = [p + max(c, r) for p, c, r in zip(n_prompt, n_chosen, n_rejected)]
    stats = length_stats(longest, max_length)

    def spread(values: list[int]) -> dict[str, Any]:
        return {k: v for k, v in length_stats(values, max_length).items() if k in ("min", "median", "p95", "max")}

    full_prompts = sum(n >= max_length for n in n_prompt)
    trained = sum(n_chosen) + sum(n_rejected)
    total = sum(n_prompt) + trained
    example, tokens = loaded.examples[0], pairs[0]
    texts = pair_texts(tokens, tokenizer)
    bad = bool(loaded.skipped) and not args.skip_bad_rows
    if args.json:
        _print_json({**loaded.summary(), "forced_format": args.format is not None, "method": method,
                     "model": model.spec, "chat_template": template.to_dict(), "tokens": stats,
                     "prompt_tokens": spread(n_prompt), "chosen_tokens": spread(n_chosen),
                     "rejected_tokens": spread(n_rejected), "prompts_filling_max_length": full_prompts,
                     "total_tokens": total, "trained_tokens": trained,
                     "example": {"where": example.where, **texts,
                                 "tokens": {"prompt": n_prompt[0], "chosen": n_chosen[0], "rejected": n_rejected[0],
                                            "longest_pair": longest[0]}}})
        return 1 if bad else 0
    con = Console(highlight=False)
    _inspect_header(con, args, loaded, model, template)

    def line(values: list[int]) -> str:
        s = spread(values)
        return f"min {s['min']} · median {s['median']:g} · max {s['max']}"

    con.print(f"[bold]Tokens[/]    prompt {line(n_prompt)}; chosen {line(n_chosen)}; rejected {line(n_rejected)}"
              f"  ({total} in all, {trained} in the answers)", soft_wrap=True)
    if stats["rows_over_max_length"]:
        n = stats["rows_over_max_length"]
        con.print(f"[yellow]Too long[/]  {n} pair{'s' * (n != 1)} exceed{'s' * (n == 1)} max_length {max_length} "
                  f"(prompt + the longer answer) by up to {stats['max_excess_tokens']} tokens "
                  f"(median {stats['median_excess_tokens']:g}); they will be truncated", soft_wrap=True)
    else:
        con.print(f"[bold]Length[/]    every pair fits max_length {max_length} (prompt + the longer answer: "
                  f"at most {stats['max']} tokens)")
    if full_prompts:
        one = full_prompts == 1
        fate = ("leaves " + ("that pair" if one else "those pairs") + " out" if method == "dpo"
                else "cuts " + ("its answers" if one else "their answers") + " to nothing")
        con.print(f"[yellow]Too long[/]  {full_prompts} prompt{'s' * (not one)} alone fill{'s' * one} max_length "
                  f"{max_length}; trl's {trainer} {fate}", soft_wrap=True)
    con.print(f"\n[bold]Example[/] ({example.where}) as trl's {trainer} tokenizes it: the prompt, then each "
              "answer between « and »:", soft_wrap=True)
    con.print(f"[bold]Prompt[/]    {n_prompt[0]} tokens")
    con.print(Text(texts["prompt"], style="dim"), soft_wrap=True)
    for key, n in (("chosen", n_chosen[0]), ("rejected", n_rejected[0])):
        con.print(f"[bold]{key.capitalize():9}[/] {n} tokens (with the prompt: {n_prompt[0] + n} of max_length "
                  f"{max_length})")
        con.print(Text("«" + texts[key] + "»", style="bold green"), soft_wrap=True)
    return _inspect_footer(con, loaded, bad)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    from localtune.data import chat_template_for, length_stats, load_data, render, tokenize
    from localtune.formats import is_preference
    from localtune.hardware import probe
    from localtune.knobs import check_knob
    from localtune.models import load_tokenizer, resolve_model
    from localtune.plan import make_plan

    if args.max_seq_len is not None:
        check_knob("max_length", args.max_seq_len, "--max-seq-len")
    _fetch_hub_data(args.file)
    loaded = load_data(args.file, format=args.format, skip_bad_rows=True, method=args.method)
    pairs = is_preference(loaded.format)
    if pairs and args.train_on_inputs:
        raise UserError("--train-on-inputs is for supervised fine-tuning; dpo and orpo score the chosen and rejected "
                        "answers after the prompt")
    model = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    max_length = args.max_seq_len or make_plan(probe(), model).knobs.max_length
    tokenizer = load_tokenizer(model)
    template = chat_template_for(tokenizer)
    if pairs:
        return _inspect_pairs(args, loaded, model, tokenizer, template, max_length)
    ds = tokenize(loaded.examples, tokenizer, template, train_on_inputs=args.train_on_inputs)
    lengths = ds["length"]
    stats = length_stats(lengths, max_length)
    trained = sum(sum(m) for m in ds["assistant_masks"])
    example = loaded.examples[0]
    text, spans, _ = render(example, tokenizer, template, args.train_on_inputs)
    bad = bool(loaded.skipped) and not args.skip_bad_rows
    if args.json:
        _print_json({**loaded.summary(), "forced_format": args.format is not None, "method": "sft",
                     "model": model.spec, "chat_template": template.to_dict(), "tokens": stats,
                     "total_tokens": sum(lengths), "trained_tokens": trained,
                     "example": {"where": example.where, "text": text, "trained_spans": spans}})
        return 1 if bad else 0
    con = Console(highlight=False)
    _inspect_header(con, args, loaded, model, template)
    con.print(f"[bold]Tokens[/]    min {stats['min']} · median {stats['median']:g} · p95 {stats['p95']} · max {stats['max']}"
              f"  ({sum(lengths)} in all, {trained} trained on)")
    if stats["rows_over_max_length"]:
        con.print(f"[yellow]Too long[/]  {stats['rows_over_max_length']} rows exceed max_length {max_length} "
                  f"by up to {stats['max_excess_tokens']} tokens (median {stats['median_excess_tokens']:g}); "
                  "they will be truncated", soft_wrap=True)
    else:
        con.print(f"[bold]Length[/]    every row fits max_length {max_length}")
    con.print(f"\n[bold]Example[/] ({example.where}); the trained part is between « and »:")
    con.print(_marked_example(text, spans), soft_wrap=True)
    return _inspect_footer(con, loaded, bad)


def cmd_data_formats(args: argparse.Namespace) -> int:
    from localtune.formats import FORMATS, PREFERENCE_METHODS, SFT_METHODS

    groups = ((SFT_METHODS, "Supervised fine-tuning (--method sft, the default) reads:"),
              (PREFERENCE_METHODS, "Preference pairs, for --method dpo and --method orpo:"))
    for methods, title in groups:
        print(title)
        for f in FORMATS.values():
            if f.methods != methods:
                continue
            opt = f" (optional: {', '.join(f.optional)})" if f.optional else ""
            print(f"  {f.name:20} {f.description}; keys: {', '.join(f.required)}{opt}")
            for example in (f.example, *f.more_examples):
                print(f"  {'':20} {json.dumps(example)}")
    print("The format is detected from each row's keys (a row with chosen and rejected is a preference pair); "
          "--format NAME forces one.")
    return 0


# ---------------------------------------------------------------- train, runs, stop, resume


def _run_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """([run] table, pinned knobs) from --config, then the command line over it."""
    from localtune.launch import default_run_config, read_config_file

    file_cfg = read_config_file(args.config) if args.config else {"run": {}, "knobs": {}}
    run_cfg = default_run_config()
    run_cfg.update(file_cfg["run"])
    for key in ("model", "data", "eval_data", "eval_split", "format", "profile"):
        value = getattr(args, key, None)
        if value is not None:
            run_cfg[key] = value
    for flag in ("train_on_inputs", "skip_bad_rows", "trust_remote_code", "notify"):
        if getattr(args, flag, False):
            run_cfg[flag] = True
    if getattr(args, "eval_split", None) is not None:
        from localtune.config import check_eval_split

        run_cfg["eval_split"] = check_eval_split(args.eval_split)
    if getattr(args, "max_gpu_temp", None) is not None:
        from localtune.config import check_max_gpu_temp

        run_cfg["max_gpu_temp"] = check_max_gpu_temp(args.max_gpu_temp)
    pinned = {**file_cfg["knobs"], **_pinned_from_args(args)}
    return run_cfg, pinned


@contextmanager
def _download_bar() -> Iterator[Callable[[Any], None]]:
    """A rich progress bar on stderr for hub downloads (localtune.download): bytes, speed, ETA;
    the report function to hand to them."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
    tasks: dict[str, Any] = {}

    def report(p: Any) -> None:
        if not tasks:  # started on the first report: nothing to fetch draws nothing (not even a blank line)
            bar.start()
        if p.repo not in tasks:
            tasks[p.repo] = bar.add_task(p.repo, total=p.bytes_total)
        bar.update(tasks[p.repo], completed=p.bytes_done, total=p.bytes_total)

    try:
        yield report
    finally:
        if tasks:
            bar.stop()


def _fetch_hub_data(*sources: str) -> None:
    """Hub datasets among `sources` are downloaded first, with a progress bar (local files and
    cached datasets: nothing happens)."""
    from localtune.data import fetch_hub_dataset

    with _download_bar() as report:
        for source in sources:
            if source:
                fetch_hub_dataset(source, report)


def _wants_tui(args: argparse.Namespace) -> bool:
    """Follow a run in the TUI's dashboard: on a terminal, unless --headless."""
    return not args.headless and sys.stdin.isatty() and sys.stdout.isatty()


def cmd_train(args: argparse.Namespace) -> int:
    from localtune.engines import require_engine
    from localtune.hardware import probe
    from localtune.headless import follow
    from localtune.launch import continue_from, prepare_run, start_worker, with_method_defaults
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    run_cfg, pinned = _run_config(args)
    if args.method is not None:
        pinned["method"] = args.method
    model = resolve_model(run_cfg["model"], trust_remote_code=bool(run_cfg["trust_remote_code"]))
    from_spec = args.from_run or run_cfg.get("from_run")  # --from, or from_run in a --config file
    from_data = None
    if from_spec:
        pinned.setdefault("method", "dpo")
        if pinned["method"] == "sft":
            raise UserError(f"--from {from_spec}: continuing a run's adapter is for preference tuning; "
                            "use --method dpo or --method orpo (or leave --method out: dpo)")
        src, lora = continue_from(from_spec, model)
        pinned.update(lora)
        run_cfg["from_run"], run_cfg["from_adapter"] = src.id, str(src.adapter_dir)
        from_data = src.read_config()["run"].get("data")
    run_cfg, pinned = with_method_defaults(run_cfg, pinned, from_data=from_data)
    plan = make_plan(probe(), model, profile=run_cfg.get("profile"), pinned=pinned,
                     reference_adapter=bool(run_cfg.get("from_run")) and pinned.get("method") == "dpo",
                     gpus=args.gpus, processes=args.processes, nodes=args.nodes)
    require_engine(plan.knobs)  # engine=mlx without mlx installed: how to install it, in one line
    if not plan.fits:
        raise UserError(f"the run does not fit this machine (estimate {plan.estimate.total_bytes / GiB:.1f} GB, "
                        f"budget {plan.budget_bytes / GiB:.1f} GB); try: {'; '.join(plan.advice)}. "
                        "`localtune plan` shows the details")
    launch_by_hand = args.print_launch or plan.parallel.nodes > 1
    if launch_by_hand:  # checked before the run is written: a bad address leaves nothing behind
        from localtune.distributed import DEFAULT_PORT, default_address, parse_address

        address = parse_address(args.main_address or f"{default_address()}:{DEFAULT_PORT}", "--main-address")
    _fetch_hub_data(run_cfg["data"], run_cfg.get("eval_data") or "")
    run, warnings = prepare_run(run_cfg, plan)
    for w in warnings:
        print(f"warning: {w}")
    if run_cfg.get("max_gpu_temp") and plan.backend != "cuda":
        print(f"note: --max-gpu-temp watches an NVIDIA GPU; this run trains on {plan.backend}, so it has no effect")
    if launch_by_hand:
        return _print_launch(run, plan, *address)
    proc = start_worker(run)
    how = "" if plan.knobs.method == "sft" else f" with {plan.knobs.method.upper()}"
    if plan.knobs.engine == "mlx":
        how += " on the MLX engine"
    if run_cfg.get("from_run"):
        how += f", continuing run {run_cfg['from_run']}"
    print(f"run {run.id} started: {plan.model.display_name}{how} on {run_cfg['data']}, worker pid {proc.pid}")
    print(f"  folder: {run.path}")
    if args.detach:
        print(f"  it runs in the background: `localtune runs` lists it, `localtune stop {run.id}` stops it")
        return 0
    if _wants_tui(args):
        from localtune.tui import run_tui

        return run_tui(run=run.id)
    end = follow(run, worker=proc, bell=bool(run_cfg["notify"]))
    return 1 if end and end["kind"] in ("failed", "interrupted") else 0


def _print_launch(run, plan, host: str, port: int) -> int:
    """`train --print-launch` (and any run on several machines, which localtune cannot start on
    the others): write the run's accelerate configuration and print the command for each machine."""
    from localtune.distributed import accelerate_config, write_accelerate_config

    par = plan.parallel
    cfg = run.read_config()
    cfg["run"]["main_address"] = f"{host}:{port}"
    run.write_config(cfg)
    path = write_accelerate_config(run, accelerate_config(par.to_dict(), plan.backend, main_address=host, port=port))
    machines = "machine" if par.nodes == 1 else "machines"
    unit = ("GPU" if par.processes == 1 else "GPUs") if plan.backend == "cuda" else (
        "process" if par.processes == 1 else "processes")
    print(f"run {run.id} is ready for {par.nodes} {machines} x {par.processes} {unit} "
          f"({par.mode}, {par.world_size} ranks); nothing started yet")
    print(f"  accelerate configuration: {path}")
    print(f"  rendezvous: {host}:{port} (machine 0 listens there; the others must reach it)")
    if par.nodes > 1:
        print(f"  the run folder must be on storage every machine sees at the same path: {run.path}")
    print("run on each machine (machine 0 holds the run: its dashboard, `localtune stop`, `localtune resume`):")
    for k in range(par.nodes):
        print(f"  machine {k}: {sys.executable} -m localtune.worker {run.path} --node-rank {k}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from localtune.config import check_max_gpu_temp
    from localtune.headless import follow
    from localtune.launch import resume_run
    from localtune.runs import find_run

    run = find_run(args.run)
    changes: dict[str, Any] = {}  # overnight care can be added when resuming
    if args.notify:
        changes["notify"] = True
    if args.max_gpu_temp is not None:
        changes["max_gpu_temp"] = check_max_gpu_temp(args.max_gpu_temp)
    offset = run.events_path.stat().st_size  # follow this attempt, not the ones before it
    proc, where = resume_run(run, force=args.force, run_changes=changes)
    print(f"run {run.id} resumed {where}, worker pid {proc.pid}")
    if args.detach:
        return 0
    if _wants_tui(args):
        from localtune.tui import run_tui

        return run_tui(run=run.id)
    end = follow(run, worker=proc, offset=offset, bell=bool(run.read_config()["run"].get("notify")))
    return 1 if end and end["kind"] in ("failed", "interrupted") else 0


def cmd_attach(args: argparse.Namespace) -> int:
    from localtune.runs import find_run

    run = find_run(args.run)
    if _wants_tui(args):
        from localtune.tui import run_tui

        return run_tui(run=str(run.path))
    from localtune.headless import follow

    end = follow(run)
    return 1 if end and end["kind"] in ("failed", "interrupted") else 0


def cmd_stop(args: argparse.Namespace) -> int:
    from localtune.launch import request_stop
    from localtune.runs import find_run

    run = find_run(args.run)
    pid = request_stop(run)
    print(f"stopping run {run.id} (worker pid {pid}): it finishes the current step, writes a checkpoint "
          f"and stops; `localtune resume {run.id}` goes on from there")
    if args.wait:
        while run.live_worker_pid() is not None:
            time.sleep(0.5)
        print(f"run {run.id}: {run.state()}")
    return 0


def _age(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from localtune.runs import list_runs

    runs = [r.summary() for r in list_runs()]
    if args.json:
        _print_json(runs)
        return 0
    if not runs:
        print("no runs yet; `localtune train` starts one")
        return 0
    t = Table(box=None, pad_edge=False, header_style="bold")
    # the data and the run a preference run continues are left to --json: with them the table
    # no longer fits 80 columns
    for col in ("run", "method", "state", "step", "loss", "model", "updated"):
        t.add_column(col, no_wrap=True)
    for r in runs:
        loss = f"{r['loss']:.4f}" if isinstance(r["loss"], (int, float)) else "-"
        t.add_row(r["id"], r.get("method") or "-", r["state"], f"{r['step']}/{r['max_steps'] or '?'}", loss,
                  str(r["model"] or "-"), _age(r["updated"]))
    Console(highlight=False).print(t)
    problems = [r for r in runs if r["error"]]
    if problems:  # why each failed or unreadable run is so, one line each (the table has no room)
        print()
        for r in problems:
            print(f"{r['id']}: {r['state']}: {r['error']}")
    return 0


# ---------------------------------------------------------------- export, chat


class _StageProgress:
    """Progress of a slow step on stderr: one line per stage; on a terminal a counter too."""

    def __init__(self) -> None:
        self.stage = ""
        self.tty = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            if self.tty and self.stage:
                sys.stderr.write("\n")
            self.stage = stage
            sys.stderr.write(f"localtune: {stage}" + ("" if self.tty else "\n"))
        if self.tty and total:
            sys.stderr.write(f"\rlocaltune: {stage} {done}/{total}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.stage:
            sys.stderr.write("\n")


def _no_library_progress_bars() -> None:
    """Our own progress lines say what happens; transformers' per-file bars would only add noise."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    # the libraries' deprecation notices to each other (e.g. transformers to peft) are not the user's to act on
    warnings.filterwarnings("ignore", category=FutureWarning)


def cmd_export(args: argparse.Namespace) -> int:
    from localtune.export import export_run, human_size
    from localtune.runs import find_run

    run = find_run(args.run)
    _no_library_progress_bars()
    progress = _StageProgress()
    try:
        result = export_run(run, args.format, quant=args.quant, out=args.out, force=args.force,
                            ollama=args.ollama, progress=progress)
    finally:
        progress.close()
    if args.json:
        _print_json({"format": result.format, "quant": result.quant, "path": str(result.path),
                     "files": [str(f) for f in result.files], "checks": result.checks, "notes": result.notes,
                     "ollama_command": result.ollama_command, "seconds": result.seconds})
        return 0
    kind = f"gguf ({result.quant})" if result.quant else result.format
    print(f"exported run {run.id} as {kind} in {result.seconds:.1f} s: {result.path}")
    for f in result.files:
        print(f"  {f.relative_to(result.path)}  {human_size(f.stat().st_size)}")
    print("checked: " + ", ".join(f"{k} {json.dumps(v) if isinstance(v, str) else v}" for k, v in result.checks.items()))
    for n in result.notes:
        print(f"note: {n}")
    if result.ollama_command:
        print(f"to use it with Ollama:  {result.ollama_command}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from localtune.chat import ChatSession
    from localtune.runs import find_run

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: {args.max_new_tokens} is not a length of answer; give 1 or more "
                        "tokens, e.g. 256")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature: {args.temperature!r} is not a sampling temperature; give 0 (greedy) "
                        "or more, e.g. 0.7")
    run = find_run(args.run)
    _no_library_progress_bars()
    progress = _StageProgress()
    try:
        session = ChatSession.load(run, progress=progress)
    finally:
        progress.close()
    mode = "the base model and the tuned model answer each prompt" if args.compare else "the tuned model answers"
    print(f"chat with run {run.id}: {mode}. /reset clears the conversation; /quit or Ctrl-D ends.")

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def answer(label: str, messages: list[dict[str, str]], tuned: bool) -> str:
        print(f"{label}> ", end="", flush=True)
        try:
            text = session.reply(messages, tuned=tuned, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, on_text=stream)
        except KeyboardInterrupt:  # stop this answer, keep the chat
            print(" [stopped]")
            return ""
        print()
        return text

    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        if args.compare:  # one turn each, so both models see exactly the same prompt
            answer("base", [{"role": "user", "content": text}], tuned=False)
            answer("tuned", [{"role": "user", "content": text}], tuned=True)
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": answer("tuned", history, tuned=True)})


# ---------------------------------------------------------------- entry point


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="built-in name (default: smollm2-135m), a local folder, a .gguf file or a Hugging Face id")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N", help="pin max_length to N tokens")
    p.add_argument("--profile", default=None, help="a shipped profile name (see `localtune profiles`) or a .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="pin a knob, e.g. --set r=8 --set load_in_4bit=true (repeatable)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model whose architecture needs its own Python code")
    p.add_argument("--gpus", default=None, metavar="SPEC",
                   help="NVIDIA GPUs to train on: all, N (the first N) or a list of GPU numbers such as 0,2 "
                        "(1, for GPU 1 alone); default: every GPU that matches GPU 0 in model and memory")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="the CPU only: train with N processes on this CPU, each with 1/N of the RAM budget")
    p.add_argument("--nodes", type=int, default=1, metavar="N",
                   help="machines, each with the same GPUs (or processes); default 1")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """How a started or resumed run is followed and looked after (train and resume)."""
    p.add_argument("--headless", action="store_true",
                   help="follow in this terminal as plain text instead of the TUI's dashboard "
                        "(the default when the output is not a terminal)")
    p.add_argument("--max-gpu-temp", type=float, default=None, metavar="C",
                   help="pause between steps while the NVIDIA GPU is hotter than C degrees")
    p.add_argument("--notify", action="store_true",
                   help="ring the terminal bell and send a desktop notification when the run ends or fails")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="localtune", description="Fine-tune a language model with LoRA / QLoRA on this machine.")
    parser.add_argument("--version", action="version", version=f"localtune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("probe", help="show what this machine has and the profile it matches")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("profiles", help="list the shipped hardware profiles")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("plan", help="pick the knobs that fit this machine and explain them")
    _add_plan_options(p)
    p.add_argument("--budget", type=float, default=None, metavar="GB",
                   help="plan for a device with this much memory instead of this machine (with --backend)")
    p.add_argument("--backend", choices=("cuda", "mps", "cpu"), default=None,
                   help="the backend of that device (with --budget)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", action="store_true",
                   help="also measure one training step of the plan on this device (a minute or so), and say "
                        "what training would change")
    p.add_argument("--max-context", action="store_true",
                   help="also find the longest max_length that fits, everything else as planned, and what bounds it")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="start a run and follow it (no arguments: the built-in model on the demo set)")
    _add_plan_options(p)
    p.add_argument("--data", "-d", default=None,
                   help="training data: a file, a save_to_disk folder, a Hugging Face dataset id, or `demo` (default)")
    p.add_argument("--eval-data", default=None, help="a separate evaluation file")
    p.add_argument("--eval-split", type=float, default=None, metavar="FRACTION",
                   help="hold out this fraction of the rows for evaluation, e.g. 0.05")
    p.add_argument("--format", default=None, help="force a dataset format (see `localtune data formats`)")
    p.add_argument("--train-on-inputs", action="store_true", help="train on every token, not only the answers")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave bad rows out instead of stopping")
    p.add_argument("--config", default=None, help="a TOML file with [run] and [knobs] tables, as a run's config.toml")
    p.add_argument("--method", choices=("sft", "dpo", "orpo"), default=None,
                   help="sft (default): learn the answers; dpo / orpo: learn which of two answers is preferred "
                        "(prompt/chosen/rejected pairs; with the demo data, the preference demo)")
    p.add_argument("--from", dest="from_run", default=None, metavar="RUN",
                   help="continue a finished run's adapter with --method dpo (default) or orpo; DPO's reference "
                        "is then that run's model")
    _add_run_options(p)
    p.add_argument("--print-launch", action="store_true",
                   help="write the run and its accelerate configuration, and print the command to run on each "
                        "machine instead of starting it (implied by --nodes N > 1)")
    p.add_argument("--main-address", default=None, metavar="HOST[:PORT]",
                   help="with --nodes: where machine 0 listens for the others (default: this machine's address, "
                        "port 29500)")
    p.add_argument("--detach", action="store_true", help="start the run and return at once")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a stopped or interrupted run from its newest checkpoint")
    p.add_argument("run", help="run id (or a unique prefix, or `last`)")
    p.add_argument("--force", action="store_true", help="resume even if the model or data changed")
    _add_run_options(p)
    p.add_argument("--detach", action="store_true", help="start the worker and return at once")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("stop", help="checkpoint and stop a running run")
    p.add_argument("run", help="run id (or a unique prefix, or `last`)")
    p.add_argument("--wait", action="store_true", help="return when the worker has stopped")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("attach", help="open a run's dashboard (it may be training, stopped or finished)")
    p.add_argument("run", nargs="?", default="last", help="run id, unique prefix, `last` (default) or folder")
    p.add_argument("--headless", action="store_true",
                   help="follow in this terminal as plain text instead of the TUI's dashboard")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("runs", help="list runs with method, state, progress, loss and age")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs)

    data = sub.add_parser("data", help="check and inspect a dataset")
    dsub = data.add_subparsers(dest="data_command", parser_class=_Parser, required=True)
    p = dsub.add_parser("inspect", help="format, rows, problems, token lengths and one rendered example")
    p.add_argument("file", nargs="?", default="demo",
                   help="a .jsonl/.json/.csv/.parquet file, a save_to_disk folder, a Hugging Face dataset id, "
                        "or `demo` (the default: the demo set shipped with localtune)")
    p.add_argument("--model", "-m", default=None, help="whose tokenizer and chat template to use (default: the built-in model)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="report rows longer than N tokens (default: the plan's max_length)")
    p.add_argument("--format", default=None, help="force a format instead of detecting it (see `localtune data formats`)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="check the file for this training method (default: any format; preference pairs are shown "
                        "as trl's DPOTrainer tokenizes them, or its ORPOTrainer with --method orpo)")
    p.add_argument("--skip-bad-rows", action="store_true", help="bad rows are left out, not a failure")
    p.add_argument("--train-on-inputs", action="store_true", help="train on every token, not only the answers")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model that needs its own Python code")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_data_inspect)
    p = dsub.add_parser("formats", help="the dataset formats localtune reads")
    p.set_defaults(func=cmd_data_formats)

    p = sub.add_parser("export", help="write a finished run as a PEFT adapter, a merged model or a GGUF file")
    p.add_argument("run", help="run id (or a unique prefix, or `last`)")
    p.add_argument("--format", "-f", choices=("adapter", "merged", "gguf"), default="adapter",
                   help="adapter (default): the PEFT adapter; merged: base + adapter as one 16-bit model; "
                        "gguf: one file for llama.cpp and Ollama")
    p.add_argument("--quant", choices=("f16", "bf16", "q8_0", "q4_0"), default=None,
                   help="GGUF tensor type (default f16)")
    p.add_argument("--ollama", action="store_true", help="with --format gguf: write a Modelfile for `ollama create`")
    p.add_argument("--out", "-o", default=None, metavar="DIR",
                   help="folder to write (default: RUN_DIR/exports/<format>[-<quant>])")
    p.add_argument("--force", action="store_true", help="replace the folder if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("chat", help="chat with a run's tuned model in the terminal")
    p.add_argument("run", help="run id (or a unique prefix, or `last`)")
    p.add_argument("--compare", action="store_true", help="show the base model's and the tuned model's answers")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature (0: greedy)")
    p.set_defaults(func=cmd_chat)
    return parser


class TUICrashed(Exception):
    """The TUI ended on an exception (its cause): a bug in localtune."""


def _report_bug(exc: BaseException, *, shown: bool = False) -> None:
    """Print the traceback (unless `shown`: the TUI printed it already) and where a copy is saved."""
    from localtune.paths import home

    tb = "".join(traceback.format_exception(exc))
    if not shown:
        sys.stderr.write(tb)
    try:
        log_dir = home() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.write_text(f"localtune {__version__}\n{' '.join(sys.argv)}\n\n{tb}", encoding="utf-8")
        where = f"; the traceback is saved in {log}"
    except OSError:
        where = ""
    sys.stderr.write(f"localtune: internal error (a bug in localtune, not in your input){where}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            if not (sys.stdin.isatty() and sys.stdout.isatty()):
                parser.print_help()
                print("\n`localtune` with no command opens the terminal UI; it needs a terminal.")
                return 0
            from localtune.tui import run_tui

            return run_tui()
        return args.func(args)
    except TUICrashed as e:  # our bug inside the TUI: Textual showed the traceback; keep a copy
        _report_bug(e.__cause__ or e, shown=True)
        return 2
    except UserError as e:
        print(f"localtune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("localtune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - everything else is our bug: show it and where it is logged
        _report_bug(e)
        return 2
