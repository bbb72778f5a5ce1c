"""What a run reports: `metrics.jsonl`, TensorBoard events, a PNG loss curve, and the progress bar.

MFU (model FLOPs utilization) counts the FLOPs of the model, not of the implementation: per trained
token, 6N for the matmuls of N parameters (forward 2N, backward 4N) plus 12·L·D·T for attention
(PaLM, appendix B), divided by the devices' peak. Rematerialization's extra forward is not counted.
Two conventions differ on the attention term, and both are reported: `mfu` counts the full T×T score
matrix (PaLM, nanoGPT), `mfu_causal` half of it, the causal triangle a masked kernel can skip (6·L·D·T:
MaxText's convention), so `mfu_causal <= mfu`; compare a number only with one of the same convention.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable

import jax

from flax_gpt2.modeling.config import GPT2Config
from flax_gpt2.utils import file_io

# Dense bf16 peak FLOP/s of one JAX device, by `device.device_kind` (longest match first). TPU v2/v3
# expose each TensorCore as a device (half a chip); v4 and v5p chips are one device (megacore).
PEAK_FLOPS = {
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
}


def flops_per_token(config: GPT2Config, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token: 6N + 12·L·D·T (PaLM), or 6N + 6·L·D·T with `causal` (MaxText: attention
    over the causal triangle only)."""
    attention = 12 * config.n_layer * config.n_embd * seq_len
    return 6 * config.num_params + (attention / 2 if causal else attention)


def peak_flops(devices: Iterable[jax.Device], cpu_peak_flops: float) -> float | None:
    """Summed peak FLOP/s of `devices`; CPU devices count `cpu_peak_flops` per host. None if unknown."""
    total, cpu_hosts = 0.0, set()
    for device in devices:
        if device.platform == "cpu":
            cpu_hosts.add(device.process_index)
            continue
        kind = next((k for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in device.device_kind), None)
        if kind is None:
            return None
        total += PEAK_FLOPS[kind]
    return total + len(cpu_hosts) * cpu_peak_flops


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes. On resume, records past the restored step (logged after the last checkpoint
    by the interrupted run) are dropped, so the file reads as one uninterrupted run; nothing else is ever
    removed, and a last line cut short by a crash is tolerated (dropped). The file is rewritten through a
    temp file + rename, never truncated in place. On `gs://` (objects cannot be appended to) the file is
    re-uploaded whole every `flush_seconds` and at `close`; TensorBoard events go to a local folder
    that is copied up at the same times.
    """

    def __init__(self, workdir: str, resume_step: int = 0, flush_seconds: float = 60.0):
        self.path = file_io.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self.remote = file_io.is_url(workdir)
        self.flush_seconds = flush_seconds
        self._tb = None
        self._lines: list[str] = []
        self._last_flush = time.monotonic()
        if not self.enabled:
            return
        self._lines, changed = _kept_lines(self.path, resume_step)
        if changed:
            file_io.atomic_write(self.path, "".join(line + "\n" for line in self._lines))
        from tensorboardX import SummaryWriter
        tb_dir = file_io.join(workdir, "tensorboard")
        if self.remote:
            import tempfile
            self._tb_remote, tb_dir = tb_dir, tempfile.mkdtemp(prefix="flax_gpt2_tb_")
        self._tb_dir = tb_dir
        self._tb = SummaryWriter(tb_dir)

    def write(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        # A non-finite value (an eval loss that overflowed) is null: NaN and Infinity are not JSON.
        record = {"step": int(step), **{k: float(v) if math.isfinite(v) else None for k, v in scalars.items()}}
        line = json.dumps(record, allow_nan=False)
        self._lines.append(line)
        if self.remote:
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                self.flush()
        else:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def flush(self) -> None:
        """Makes everything written so far durable (remote: one upload of the file and the events)."""
        if not self.enabled or self._tb is None:
            return
        self._tb.flush()
        if self.remote:
            file_io.atomic_write(self.path, "".join(line + "\n" for line in self._lines))
            for name in os.listdir(self._tb_dir):
                file_io.epath(file_io.join(self._tb_remote, name)).parent.mkdir(parents=True, exist_ok=True)
                with open(os.path.join(self._tb_dir, name), "rb") as f:
                    file_io.atomic_write(file_io.join(self._tb_remote, name), f.read())
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self.flush()
            self._tb.close()
            self._tb = None


def _kept_lines(path: str, resume_step: int) -> tuple[list[str], bool]:
    """The lines of `path` to keep on a resume at `resume_step`, and whether any was dropped."""
    if not file_io.exists(path):
        return [], False
    lines = [line.strip() for line in file_io.read_text(path).split("\n")]
    lines = [line for line in lines if line]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # cut short by a crash mid-write
            kept.append(line)  # not ours to judge: keep it
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and record["step"] > resume_step:
            continue
        kept.append(line)
    return kept, len(kept) != len(lines)


def read_metrics(workdir: str) -> list[dict]:
    """The records of `workdir/metrics.jsonl` (a last line cut short by a crash is skipped)."""
    records = []
    for line in file_io.read_text(file_io.join(workdir, "metrics.jsonl")).split("\n"):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_losses(workdir: str, out: str | None = None) -> str:
    """Draws train and eval loss against step into `workdir/loss.png` (or `out`); returns the path."""
    out = out or file_io.join(workdir, "loss.png")
    file_io.atomic_write(out, loss_png(read_metrics(workdir)))
    return out


def loss_png(records: list[dict], *, title: str | None = None, mark_step: int | None = None, dpi: int = 120,
             size: tuple[float, float] = (7, 4)) -> bytes:
    """PNG bytes of train and eval loss against step for `metrics.jsonl` records (`read_metrics`).

    Uses matplotlib's `Figure` directly, not pyplot, so it is safe to call from a thread (the notebooks'
    live curve). `mark_step` draws a dotted line at that step (e.g. where a run resumed).
    """
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    if mark_step:
        ax.axvline(mark_step, color="gray", linestyle=":", label=f"resumed at step {mark_step}")
    if title:
        ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class Progress:
    """A tqdm bar over optimizer steps showing its own ETA, loss, tokens/s and MFU; process 0 only.

    Throughput and the ETA are measured between `update` calls that say `timed=True`, so compilation
    (the first step of every start or restart), eval and checkpoint pauses are left out: until a timed
    step has run they read `?` and the bar says the first step is compiling (tqdm's own ETA would
    extrapolate the compile time over the whole run: hours after step 1 of a minutes-long run).
    """

    def __init__(self, total: int, initial: int, tokens_per_step: int, flops_per_token: float,
                 peak: float | None, enabled: bool = True, causal_flops_per_token: float | None = None):
        self.total, self.tokens_per_step, self.flops_per_token = total, tokens_per_step, flops_per_token
        self.causal_flops_per_token = causal_flops_per_token
        self.peak = peak
        self._bar = None
        if enabled and jax.process_index() == 0:
            import tqdm
            self._bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, postfix="ETA ?",
                                  bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self._steps, self._seconds, self._last = 0, 0.0, None
        self._waited = 0.0  # of `_seconds`: waiting for batches
        self._n = initial
        self.tokens_per_sec = math.nan
        self.mfu = math.nan
        self.mfu_causal = math.nan  # MaxText's convention (module docstring); NaN unless causal FLOPs are given

    def start_timing(self) -> None:
        self._last = time.perf_counter()

    def update(self, loss: float, timed: bool = True, data_wait: float = 0.0) -> None:
        """One step done, its loss; `data_wait`: the seconds of it spent waiting for the batch."""
        now = time.perf_counter()
        untimed = None if self._last is None else now - self._last
        if timed and self._last is not None:
            self._steps += 1
            self._seconds += now - self._last
            self._waited += data_wait
            self.tokens_per_sec = self._steps * self.tokens_per_step / self._seconds
            if self.peak:
                self.mfu = self.tokens_per_sec * self.flops_per_token / self.peak
                if self.causal_flops_per_token is not None:
                    self.mfu_causal = self.tokens_per_sec * self.causal_flops_per_token / self.peak
        self._last = now
        self._n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(loss, None if timed else untimed), refresh=False)
            self._bar.update(1)

    def postfix(self, loss: float, untimed_seconds: float | None = None) -> str:
        """`ETA 0:42, loss=3.1416, tok/s=1,234, MFU=5.6%`; before any timed step `ETA ?, loss=..., first step
        12.3 s (compiling)` (`untimed_seconds`: how long the last, untimed, step took)."""
        if not self._steps:
            text = f"ETA ?, loss={loss:.4f}"
            if untimed_seconds is not None:
                text += f", first step {untimed_seconds:.1f} s (compiling)"
            return text
        import tqdm

        eta = tqdm.tqdm.format_interval(max(self.total - self._n, 0) * self._seconds / self._steps)
        text = f"ETA {eta}, loss={loss:.4f}, tok/s={self.tokens_per_sec:,.0f}"
        if self.peak:
            text += f", MFU={100 * self.mfu:.1f}%"
        if self._waited > 0.01 * self._seconds:  # an input-bound run shows it
            text += f", data wait {100 * self._waited / self._seconds:.0f}%"
        return text

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        elif jax.process_index() == 0:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
