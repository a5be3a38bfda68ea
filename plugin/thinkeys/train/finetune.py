"""``thinkeys finetune``: recover a thin-key checkpoint's quality by training only its thin q/k.

Two stages, each optional, in this order (the order and the defaults were chosen by measurement,
see bench-results/quality/README.md):

1. **layer-wise** (:mod:`thinkeys.train.layerwise`): one teacher pass over ``layerwise_windows``
   windows of tune text, then each layer's thin q/k is fitted to the original layer's attention
   output for ``layerwise_steps`` Adam steps. Cheap: no backward through the model.
2. **end-to-end** (:mod:`thinkeys.train.logit`): AdamW on the whole model's output, by default the
   KL divergence to the original model's next-token distribution, for ``e2e_steps`` steps or
   ``e2e_minutes`` of wall time (whichever ends first), each step on fresh tune windows.

Only the thin query/key projections (and with ``train_freqs`` the per-head RoPE tables; with ``train_queries`` a
rebuild-at-read checkpoint's query projection, with ``query_rank`` as a low-rank change) change
(:mod:`thinkeys.train.params`); the result is written with
:func:`thinkeys.reference.save_thin_model`, so it is a normal thin-key checkpoint that the plugin
serves unchanged. The run is resumable from its work folder and an interrupted run never leaves
a DST behind (:mod:`thinkeys.train.workdir`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from thinkeys import hf_io
from thinkeys.checkpoint import CONFIG_KEY, ThinKeyConfig, ThinKeyError
from thinkeys.convert.calibration import read_token_ids, token_windows
from thinkeys.train.layerwise import capture_teacher, cosine_lr, fit_layer
from thinkeys.train.logit import LOSS_KINDS, distill_step
from thinkeys.train.params import FREQS, freeze_freqs, layer_tensors, merge_low_rank, thin_attention_modules, trainable_tensors
from thinkeys.train.workdir import WorkDir, interrupts_raise

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FinetuneSettings(BaseModel):
    """Everything that determines a run; a resumed run must have the same settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str
    teacher: str
    text: str
    text_sha256: str
    window: int = Field(512, ge=16, description="tokens per training window")
    seed: int = 0
    layerwise_windows: int = Field(16, ge=0, description="windows the layer-wise stage fits on")
    layerwise_steps: int = Field(150, ge=0, description="Adam steps per layer (0 skips the stage)")
    layerwise_batch: int = Field(2, ge=1)
    layerwise_lr: float = Field(1e-3, gt=0)
    layerwise_queries: int = Field(64, ge=1, description="query positions per window and step (all positions stay keys)")
    layerwise_store: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the teacher's activations are kept in (bfloat16: half the memory, twice the windows)")
    e2e_steps: int | None = Field(None, ge=0, description="end-to-end steps (None: limited by e2e_minutes only)")
    e2e_minutes: float | None = Field(None, ge=0, description="end-to-end wall-time budget")
    e2e_batch: int = Field(1, ge=1, description="windows per end-to-end step")
    e2e_lr: float = Field(5e-4, gt=0)
    loss: Literal["kl", "ce", "kl+ce"] = "kl"
    train_freqs: bool = False
    train_queries: bool = Field(False, description="rebuild-at-read: also train the source's d-wide query projection")
    query_rank: int | None = Field(None, ge=1, description="with train_queries: train the query change as a rank-K product")
    freq_lr: float = Field(1e-4, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class FinetuneReport(BaseModel):
    dst: str
    work_dir: str
    settings: FinetuneSettings
    seconds: dict[str, float]
    tokens: dict[str, int]
    layerwise_error: list[tuple[float, float]] = Field(description="per layer: relative output error before, after")
    e2e_steps: int
    e2e_ppl_ratio_last: float | None = Field(
        None, description="exp(mean(ce_student - ce_teacher)) over the last 10% of steps, on not-yet-trained windows"
    )

    def summary(self) -> str:
        parts = [f"Fine-tuned thin q/k into {self.dst} in {sum(self.seconds.values()) / 60:.1f} min"]
        if self.layerwise_error:
            before = sum(b for b, _ in self.layerwise_error) / len(self.layerwise_error)
            after = sum(a for _, a in self.layerwise_error) / len(self.layerwise_error)
            parts.append(f"layer-wise: mean relative attention-output error {before:.4f} -> {after:.4f}")
        if self.e2e_steps:
            parts.append(f"end-to-end: {self.e2e_steps} steps, {self.tokens.get('e2e', 0):,} tokens")
        if self.e2e_ppl_ratio_last is not None:
            parts.append(f"running PPL ratio vs the original on fresh tune text: {self.e2e_ppl_ratio_last:.4f}")
        return "; ".join(parts) + f". Log: {self.work_dir}/log.jsonl. Measure with `thinkeys eval ppl --model {self.dst}`."


def default_work_dir(dst: str | Path) -> Path:
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.finetune"


def _refuse_eval_split(text: Path, sha: str) -> None:
    """Refuse to tune on the held-out split of a `thinkeys fetch` corpus (its manifest lies beside it)."""
    manifest = text.parent / "manifest.json"
    if not manifest.is_file():
        return
    try:
        splits = json.loads(manifest.read_text()).get("splits", {})
    except ValueError:
        return
    for name, info in splits.items():
        if name != "tune" and isinstance(info, dict) and info.get("sha256") == sha:
            raise ThinKeyError(
                f"{text} is the held-out '{name}' split of {manifest.parent}; fine-tune on the 'tune' split "
                f"({splits.get('tune', {}).get('file', 'tune.txt')}) and keep '{name}' for scoring"
            )


def _check_inputs(student: Path, teacher: Path, dst: Path, text: Path, force: bool) -> ThinKeyConfig:
    thin = ThinKeyConfig.from_pretrained(student)
    teacher_config = teacher / "config.json"
    if not teacher_config.is_file():
        raise ThinKeyError(f"--teacher {teacher}: not a checkpoint folder (no config.json); give the original model")
    raw = json.loads(teacher_config.read_text())
    if CONFIG_KEY in raw:
        raise ThinKeyError(f"--teacher {teacher} is a thin-key checkpoint; the teacher is the original (unconverted) model")
    if (raw.get("architectures") or [None])[0] != thin.source_architecture:
        raise ThinKeyError(
            f"--teacher {teacher} is {raw.get('architectures')}, but {student} was converted from a "
            f"{thin.source_architecture}; give the model it was converted from"
        )
    student_raw = json.loads((student / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key in raw and key in student_raw and raw[key] != student_raw[key]:
            raise ThinKeyError(f"--teacher {teacher}: {key} {raw[key]} differs from the student's {student_raw[key]}; give the model it was converted from")
    if thin.source_architecture == "GPT2LMHeadModel":
        raise ThinKeyError("thinkeys finetune supports Llama-family thin checkpoints (Llama, Mistral, Qwen2)")
    if not text.is_file():
        raise ThinKeyError(f"--text {text}: no such file; fine-tune on the tune split (data/wiki/tune.txt from `thinkeys fetch`)")
    dst = dst.absolute()
    if dst.exists() and not force:
        raise ThinKeyError(f"{dst}: already exists; choose another destination or pass --force to replace it")
    if dst in (student.absolute(), teacher.absolute()):
        raise ThinKeyError(f"{dst}: DST must be a new folder, not the student or the teacher")
    return thin


def _trainable_state(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in named.items()}


@torch.no_grad()
def _load_trainable_state(named: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    if set(saved) != set(named):
        raise ThinKeyError("the saved state does not match this model's trainable tensors; pass --restart")
    for n, p in named.items():
        p.copy_(saved[n])


def finetune(
    student: str | Path,
    dst: str | Path,
    *,
    teacher: str | Path,
    text: str | Path,
    work_dir: str | Path | None = None,
    resume: bool = True,
    force: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **options: Any,
) -> FinetuneReport:
    """Recover ``student`` (a thin-key checkpoint) toward ``teacher`` (its original) on ``text``; write DST.

    ``options`` are :class:`FinetuneSettings` fields (``layerwise_steps``, ``e2e_minutes``, ``loss``, ...).
    With ``resume`` (default) a run whose work folder holds state continues where it stopped.
    ``device``: where to train (``"cuda"`` on a GPU machine; the teacher's activations stay there too).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thinkeys.reference import load_thin_model, save_thin_model

    student, teacher, text, dst = Path(student), Path(teacher), Path(text), Path(dst)
    thin = _check_inputs(student, teacher, dst, text, force)
    sha = hf_io.sha256_file(text)
    _refuse_eval_split(text, sha)
    settings = FinetuneSettings(
        student=str(student.absolute()), teacher=str(teacher.absolute()), text=str(text.absolute()), text_sha256=sha, **options
    )
    if settings.e2e_steps is None and settings.e2e_minutes is None and settings.layerwise_steps == 0:
        raise ThinKeyError("nothing to do: give --layerwise-steps and/or --e2e-steps / --e2e-minutes")
    work = WorkDir(work_dir if work_dir is not None else default_work_dir(dst))
    resuming = work.start(settings.model_dump(mode="json"), resume=resume)

    tokenizer = AutoTokenizer.from_pretrained(student)
    ids = read_token_ids(tokenizer, text)
    windows = token_windows(ids, settings.window, None, seed=settings.seed)  # [N, T], seeded order
    n_lw = settings.layerwise_windows if settings.layerwise_steps else 0
    if n_lw + settings.e2e_batch > len(windows):
        raise ThinKeyError(
            f"--text has {len(windows)} windows of {settings.window} tokens; the layer-wise stage needs "
            f"{n_lw} plus at least {settings.e2e_batch} for end-to-end steps: give more text or fewer windows"
        )

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ThinKeyError("--device cuda: no CUDA device is visible to torch here")
    model = load_thin_model(student, torch.float32, device=device)
    out_dtype = DTYPES[settings.dtype] if settings.dtype else _checkpoint_dtype(student)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    named = trainable_tensors(model, train_freqs=settings.train_freqs, train_queries=settings.train_queries,
                              query_rank=settings.query_rank, teacher=teacher_model)
    state: dict[str, Any] = {"layers_done": 0, "e2e_step": 0, "e2e_seconds": 0.0, "seconds": {}, "tokens": {},
                             "layerwise_error": [], "optimizer": None}
    if resuming:
        state = work.load_state()
        _load_trainable_state(named, state["trainable"])
        print(f"thinkeys finetune: resuming from {work.path} (layers done {state['layers_done']}, "
              f"end-to-end step {state['e2e_step']})")

    def save() -> None:
        work.save_state({**state, "trainable": _trainable_state(named)})

    attn_modules = thin_attention_modules(model)
    n_layers = len(attn_modules)

    with interrupts_raise():
        # --- stage 1: layer-wise ---------------------------------------------------------------
        if n_lw and state["layers_done"] < n_layers:
            start = time.monotonic()
            acts = capture_teacher(teacher_model, windows[:n_lw], progress=progress, dtype=DTYPES[settings.layerwise_store])
            bar = tqdm(total=n_layers, initial=state["layers_done"], desc="layer-wise", unit="layer", disable=not progress)
            try:
                for l, (prefix, attn) in enumerate(attn_modules.items()):
                    if l < state["layers_done"]:
                        continue
                    layer_start = time.monotonic()
                    mine = layer_tensors(named, prefix)
                    weights = [p for n, p in mine.items() if not n.endswith(FREQS)]
                    freqs = [p for n, p in mine.items() if n.endswith(FREQS)]
                    before, after = fit_layer(
                        attn, weights, acts.inputs[l], acts.outputs[l],
                        steps=settings.layerwise_steps, lr=settings.layerwise_lr, batch=settings.layerwise_batch,
                        queries=settings.layerwise_queries,
                        seed=settings.seed + l, freq_params=freqs, freq_lr=settings.freq_lr,
                    )
                    state["layerwise_error"].append((before, after))
                    state["layers_done"] = l + 1
                    state["seconds"]["layerwise"] = state["seconds"].get("layerwise", 0.0) + time.monotonic() - start
                    start = time.monotonic()
                    save()
                    work.log({"stage": "layerwise", "layer": l, "error_before": before, "error_after": after,
                              "seconds": round(time.monotonic() - layer_start, 2)})
                    bar.set_postfix(error=f"{before:.3f}->{after:.3f}", refresh=False)
                    bar.update(1)
            finally:
                bar.close()
            del acts
            state["tokens"]["layerwise"] = n_lw * settings.window

        # --- stage 2: end-to-end -----------------------------------------------------------------
        budget_s = None if settings.e2e_minutes is None else settings.e2e_minutes * 60
        max_steps = settings.e2e_steps
        if max_steps is not None or budget_s is not None:
            model.train()  # no dropout in these models; keeps HF from caching
            params = list(named.values())
            weight_params = [p for n, p in named.items() if not n.endswith(FREQS)]
            freq_params = [p for n, p in named.items() if n.endswith(FREQS)]
            groups = [{"params": weight_params, "lr": settings.e2e_lr, "base": settings.e2e_lr}]
            if freq_params:
                groups.append({"params": freq_params, "lr": settings.freq_lr, "base": settings.freq_lr})
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
            if state.get("optimizer") is not None:
                optimizer.load_state_dict(state["optimizer"])

            def progress_of(step: int, seconds: float) -> float:
                parts = []
                if max_steps:
                    parts.append(step / max_steps)
                if budget_s:
                    parts.append(seconds / budget_s)
                return max(parts) if parts else 1.0

            use_teacher = settings.loss != "ce"
            bar = tqdm(total=max_steps, initial=state["e2e_step"], desc="end-to-end", unit="step", disable=not progress)
            last_save = time.monotonic()
            try:
                while progress_of(state["e2e_step"], state["e2e_seconds"]) < 1.0:
                    step = state["e2e_step"]
                    begin = (n_lw + step * settings.e2e_batch) % (len(windows) - settings.e2e_batch + 1)
                    batch = windows[begin : begin + settings.e2e_batch].to(device)
                    scale = cosine_lr(1.0, progress_of(step, state["e2e_seconds"]))
                    for group in optimizer.param_groups:
                        group["lr"] = group["base"] * scale
                    t0 = time.monotonic()
                    stats = distill_step(model, teacher_model if use_teacher else None, batch, optimizer, params, kind=settings.loss)
                    dt = time.monotonic() - t0
                    state["e2e_step"] = step + 1
                    state["e2e_seconds"] += dt
                    state["tokens"]["e2e"] = state["tokens"].get("e2e", 0) + stats.tokens
                    work.log({"stage": "e2e", "step": step, "tokens": state["tokens"]["e2e"],
                              "seconds": round(state["e2e_seconds"], 2), "lr": settings.e2e_lr * scale,
                              "loss": stats.loss, "kl": stats.kl, "ce_student": stats.ce_student,
                              "ce_teacher": stats.ce_teacher})
                    postfix = {"loss": f"{stats.loss:.4f}", "tok/s": f"{stats.tokens / dt:.0f}"}
                    if stats.ce_teacher is not None:
                        postfix["ppl_ratio"] = f"{math.exp(stats.ce_student - stats.ce_teacher):.3f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                    if time.monotonic() - last_save > 60:
                        state["optimizer"] = optimizer.state_dict()
                        save()
                        last_save = time.monotonic()
            except KeyboardInterrupt:
                state["optimizer"] = optimizer.state_dict()
                save()
                print(f"\nthinkeys finetune: interrupted; state saved in {work.path}, run the same command to resume")
                raise
            finally:
                bar.close()
            state["seconds"]["e2e"] = state["e2e_seconds"]
            state["optimizer"] = optimizer.state_dict()
            save()

        # --- write DST ---------------------------------------------------------------------------
        del teacher_model
        freeze_freqs(model)
        merge_low_rank(model)
        model.eval().to(device="cpu", dtype=out_dtype)
        save_thin_model(model, dst, source=student, force=force)

    e2e_log = [r for r in work.read_log() if r.get("stage") == "e2e" and r.get("ce_teacher") is not None]
    tail = e2e_log[-max(1, len(e2e_log) // 10):] if e2e_log else []
    report = FinetuneReport(
        dst=str(dst.absolute()),
        work_dir=str(work.path),
        settings=settings,
        seconds={k: round(v, 1) for k, v in state["seconds"].items()},
        tokens=state["tokens"],
        layerwise_error=state["layerwise_error"],
        e2e_steps=state["e2e_step"],
        e2e_ppl_ratio_last=math.exp(sum(r["ce_student"] - r["ce_teacher"] for r in tail) / len(tail)) if tail else None,
    )
    (work.path / "summary.json").write_text(report.model_dump_json(indent=2) + "\n")
    work.state_path.unlink(missing_ok=True)  # done: the state is no longer needed (log and summary stay)
    return report


def _checkpoint_dtype(path: Path) -> torch.dtype:
    raw = json.loads((path / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)
