"""Measure lstm-surgeon against its performance goals on ~1 GB and ~1 MB checkpoints.

    python benchmarks/run.py [--size-mb 1000] [--repeat 3] [--keep] [--regenerate] [--strict]

1. Generates (or reuses) checkpoints in benchmarks/data/ (gitignored): an `nn.Embedding` big enough
   to reach --size-mb, a 2-layer bidirectional `nn.LSTM` (hidden 1024), an `nn.GRU` and a linear
   head, saved with `torch.save` (.pt) and `safetensors.torch.save_file` (.safetensors); plus ~1 MB
   files with the same layer types in small sizes. Generation runs in a child interpreter, so this
   process never imports torch and holds no tensor memory while it measures.
2. Runs every command in a fresh process and records its wall time (around `os.wait4`) and peak
   RSS (GNU `time -f %M` when present, else `ru_maxrss` from `os.wait4`). The commands compared by one goal run in the same group, interleaved: each
   repetition runs all of them (in alternating order), after one untimed warm-up run each. The median
   of --repeat runs is reported. Nothing is dropped from the page cache: every input is read once
   before timing, so both sides of each ratio run warm.
3. Prints the measurements and a markdown table of the goals, and writes everything as JSON to
   benchmarks/data/results.json.

Without --keep, the large files (and their working copies) are deleted at the end; with --keep they
stay and later runs reuse them (same --size-mb, same bytes) unless --regenerate is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fixtures"))
from range_server import serve  # the HTTP server the remote-read tests use

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MANIFEST = DATA / "manifest.json"
RESULTS = DATA / "results.json"
PYTHON = sys.executable
SURGEON = str(Path(sys.executable).parent / "lstm-surgeon")
MB = 1_000_000
MIB = 1 << 20
SMALL_MB = 1
MANY = 500  # small checkpoints inspected in one call
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RSS_SOURCE = (
    "GNU time %M (the command's own peak)"
    if GNU_TIME
    else "os.wait4 ru_maxrss (includes this process's RSS as a floor)"
)

# The layer sizes of the two models: (embedding dim, LSTM hidden, GRU hidden, head outputs).
BIG_SPEC = {"embedding_dim": 512, "lstm_hidden": 1024, "gru_hidden": 512, "classes": 1000}
SMALL_SPEC = {"embedding_dim": 64, "lstm_hidden": 32, "gru_hidden": 32, "classes": 10}

NAIVE_SCRIPT = '''\
"""The naive way: load everything with torch, set the LSTM forget-gate biases, save everything."""
import sys

import torch

state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
for name, tensor in state.items():
    if name.startswith("encoder.bias_"):  # the LSTM; gates are i, f, g, o
        hidden = tensor.shape[0] // 4
        tensor[hidden : 2 * hidden] = 1.0 if "bias_ih" in name else 0.0
torch.save(state, sys.argv[2])
'''


# --- Data -------------------------------------------------------------------------------------


def size_label(nbytes: int) -> str:
    """ "1 GB", "170 MB": the goals' names carry the size of the big file actually measured."""
    return f"{nbytes / 1e9:.2g} GB" if nbytes >= 995 * MB else f"{nbytes / MB:.0f} MB"


def big_stem(size_mb: int) -> str:
    return f"lstm-{size_mb}mb"


def small_stem() -> str:
    return f"lstm-{SMALL_MB}mb"


def spec_for(stem: str, size_mb: int) -> dict[str, Any]:
    base = SMALL_SPEC if stem == small_stem() else BIG_SPEC
    return {**base, "target_bytes": size_mb * MB}


def _load_manifest() -> dict[str, Any]:
    try:
        return json.loads(MANIFEST.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _is_current(path: Path, spec: dict[str, Any], manifest: dict[str, Any]) -> bool:
    entry = manifest.get(path.name)
    return (
        entry is not None
        and entry.get("spec") == spec
        and path.is_file()
        and path.stat().st_size == entry.get("bytes")
    )


def generate(stem: str, size_mb: int) -> None:
    """Build the model's state dict and save it in both formats (in this process: needs torch)."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    spec = spec_for(stem, size_mb)
    dim, hidden, gru_hidden = spec["embedding_dim"], spec["lstm_hidden"], spec["gru_hidden"]
    torch.manual_seed(0)
    layers: dict[str, nn.Module] = {
        "encoder": nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True),
        "gru": nn.GRU(2 * hidden, gru_hidden, batch_first=True),
        "head": nn.Linear(gru_hidden, spec["classes"]),
    }
    rest = sum(p.numel() * p.element_size() for m in layers.values() for p in m.parameters())
    rows = max(1, (spec["target_bytes"] - rest) // (dim * 4))
    if rest > spec["target_bytes"]:
        print(f"  note: the recurrent layers alone take {rest / MB:.0f} MB (> --size-mb)")
    # Embedding init (normal_) is one big kernel; fine at 1 GB. Keep it first, as models do.
    model = nn.ModuleDict({"embedding": nn.Embedding(rows, dim), **layers})
    state = model.state_dict()
    del model
    manifest = _load_manifest()
    for suffix in (".pt", ".safetensors"):
        path = DATA / f"{stem}{suffix}"
        temp = path.with_name(path.name + ".partial")
        started = time.perf_counter()
        if suffix == ".pt":
            torch.save(state, temp)
        else:
            save_file(state, str(temp))  # zero-copy: streams the tensors' memory to the file
        os.replace(temp, path)
        manifest[path.name] = {"bytes": path.stat().st_size, "spec": spec}
        print(
            f"  wrote {path.relative_to(HERE.parent)} ({path.stat().st_size / MB:.1f} MB) "
            f"in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


SHARDS = 10


def sharded_paths(size_mb: int) -> tuple[Path, Path]:
    """The big checkpoint with its embedding split in SHARDS row blocks: as one file, and as a
    Hugging Face sharded folder (SHARDS shards and an index) holding the very same tensors."""
    stem = f"{big_stem(size_mb)}-split"
    return DATA / f"{stem}.safetensors", DATA / f"{big_stem(size_mb)}-sharded"


def generate_sharded(size_mb: int) -> None:
    """Split the big .safetensors into the pair of `sharded_paths` (in this process: reads one
    block at a time). Shard k holds embedding block k and every SHARDS-th of the other tensors,
    so the recurrent layers span shards (a layer's biases sit in another shard than its weights),
    as in real releases."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    single, folder = sharded_paths(size_mb)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    groups: list[dict[str, Any]] = [{} for _ in range(SHARDS)]
    with safe_open(str(DATA / f"{big_stem(size_mb)}.safetensors"), framework="numpy") as source:
        names = list(source.keys())
        rows = source.get_slice("embedding.weight").get_shape()[0]
        step = -(-rows // SHARDS)
        for k in range(SHARDS):
            block = source.get_slice("embedding.weight")[k * step : min((k + 1) * step, rows)]
            groups[k][f"embedding.{k}.weight"] = block
        others = [name for name in names if name != "embedding.weight"]
        for position, name in enumerate(others):
            groups[position % SHARDS][name] = source.get_tensor(name)
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{SHARDS:05d}.safetensors"
        save_file(group, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(array.nbytes for group in groups for array in group.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    save_file({name: array for group in groups for name, array in group.items()}, str(single))


def ensure_sharded(size_mb: int, regenerate: bool) -> None:
    single, folder = sharded_paths(size_mb)
    manifest = _load_manifest()
    entry = manifest.get(folder.name)
    source = DATA / f"{big_stem(size_mb)}.safetensors"
    current = (
        entry is not None
        and entry.get("source_bytes") == source.stat().st_size
        and single.is_file()
        and (folder / "model.safetensors.index.json").is_file()
    )
    if current and not regenerate:
        print(f"reusing {single.name} / {folder.name}/", flush=True)
        return
    print(f"splitting {source.name} into {folder.name}/ ({SHARDS} shards) ...", flush=True)
    subprocess.run([PYTHON, __file__, "--generate-sharded", "--size-mb", str(size_mb)], check=True)
    manifest = _load_manifest()
    manifest[folder.name] = {"source_bytes": source.stat().st_size, "shards": SHARDS}
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def ensure_data(size_mb: int, regenerate: bool) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for stem, stem_size in ((small_stem(), SMALL_MB), (big_stem(size_mb), size_mb)):
        manifest = _load_manifest()
        spec = spec_for(stem, stem_size)
        paths = [DATA / f"{stem}{suffix}" for suffix in (".pt", ".safetensors")]
        if not regenerate and all(_is_current(path, spec, manifest) for path in paths):
            print(f"reusing {stem}.pt / {stem}.safetensors", flush=True)
            continue
        print(f"generating {stem}.pt / {stem}.safetensors ...", flush=True)
        # A child interpreter: torch and the tensors never live in the measuring process.
        subprocess.run(
            [PYTHON, __file__, "--generate-only", stem, "--size-mb", str(stem_size)], check=True
        )


# --- Measuring --------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LSTM_SURGEON_FAULT", "LSTM_SURGEON_DEBUG", "PYTHONPROFILEIMPORTTIME"):
        env.pop(name, None)
    return env


def run_once(argv: Sequence[str]) -> tuple[float, float]:
    """Run `argv`; return (wall seconds, peak RSS in MiB). Raise if it fails.

    Linux keeps the peak RSS of the pre-exec memory image in `ru_maxrss`, so a child forked from this
    process reports at least this process's RSS. GNU time forks from a ~1 MB process, so its `%M` is
    the command's own peak; it is used when present (its fork adds ~1 ms to both sides of a ratio).
    Otherwise `os.wait4`'s `ru_maxrss` is used (a floor of this process's RSS, kept small)."""
    with tempfile.TemporaryFile() as stderr, tempfile.NamedTemporaryFile("r") as rss_file:
        wrapped = list(argv)
        if GNU_TIME is not None:
            wrapped = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *wrapped]
        started = time.perf_counter()
        process = subprocess.Popen(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=child_env(),
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            stderr.seek(0)
            message = stderr.read().decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}: {message}")
        peak_kib = usage.ru_maxrss  # KiB on Linux
        if GNU_TIME is not None:
            peak_kib = int(rss_file.read().split()[-1])
    return wall, peak_kib / 1024


@dataclass
class Command:
    """One measured command. `argv` gets the number of the run (edits in place alternate values)."""

    key: str
    label: str
    argv: Callable[[int], list[str]]
    setup: Callable[[], None] | None = None  # untimed, before every run
    warmup: bool = True
    server: Any = None  # a range_server.ServerState: count the bytes this command fetched over HTTP
    budget: int = 0  # the most bytes a remote command may fetch (its goal)
    runs: int = 0
    walls: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    served: list[int] = field(default_factory=list)

    def run(self, timed: bool) -> None:
        if self.setup is not None:
            self.setup()
        if self.server is not None:
            self.server.bytes_sent = 0
        wall, rss = run_once(self.argv(self.runs))
        self.runs += 1
        if timed:
            self.walls.append(wall)
            self.rss.append(rss)
            if self.server is not None:
                self.served.append(self.server.bytes_sent)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def peak(self) -> float:
        return statistics.median(self.rss)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "argv": self.argv(0),
            "wall_s": self.walls,
            "peak_rss_mib": self.rss,
            "median_wall_s": self.wall,
            "median_peak_rss_mib": self.peak,
            **({"bytes_served": self.served, "byte_budget": self.budget} if self.served else {}),
        }


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read each file once, so both sides of every comparison start with it in the page cache."""
    chunk = bytearray(MIB)
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(chunk):
                pass


def measure_group(title: str, commands: Sequence[Command], inputs: Sequence[Path], repeat: int):
    print(f"\n## {title}", flush=True)
    warm_page_cache(inputs)
    for command in commands:
        if command.warmup:
            command.run(timed=False)
    for repetition in range(repeat):
        order = commands if repetition % 2 == 0 else list(reversed(commands))
        for command in order:
            command.run(timed=True)
            print(
                f"  [{repetition + 1}/{repeat}] {command.label:<52} "
                f"{command.walls[-1] * 1000:9.1f} ms  {command.rss[-1]:7.1f} MiB",
                flush=True,
            )


def unlink(*paths: Path) -> Callable[[], None]:
    def setup() -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    return setup


def unlink_and_sync(*paths: Path) -> Callable[[], None]:
    """Remove the previous output, then flush dirty pages (earlier writes' writeback would otherwise
    land in the next command's timing). Drops nothing from the cache."""

    def setup() -> None:
        unlink(*paths)()
        os.sync()

    return setup


def remove(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remote_budget(path: Path) -> int:
    """What `inspect` of a remote .safetensors may fetch: its header, the recurrent tensors (as
    `inspect --json` names them, sized by the header's offsets) and 1 MB."""
    result = subprocess.run(
        [SURGEON, "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    recurrent = {name for layer in json.loads(result.stdout)["layers"] for name in layer["tensors"]}
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    tensor_bytes = sum(
        header[name]["data_offsets"][1] - header[name]["data_offsets"][0] for name in recurrent
    )
    return 8 + length + tensor_bytes + MB


def sanity_check_edit(argv: list[str]) -> None:
    """The edit must be a same-structure patch (not a torch rewrite), else the numbers lie."""
    result = subprocess.run(
        [*argv, "--json"], capture_output=True, text=True, env=child_env(), check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    document = json.loads(result.stdout)
    method = (document.get("result") or {}).get("method")
    if method != "patch":
        raise RuntimeError(f"{' '.join(argv)}: expected a patch, got method {method!r}")


# --- Goals ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    name: str
    numerator: str
    denominator: str | None  # None: an absolute figure (peak RSS in MB)
    limit: float
    metric: str = "wall"  # or "rss", or "bytes" (most bytes fetched over HTTP / the budget)

    def measured(self, commands: dict[str, Command]) -> float:
        top = commands[self.numerator]
        if self.metric == "bytes":
            return max(top.served) / top.budget
        value = top.wall if self.metric == "wall" else top.peak * MIB / MB
        if self.denominator is None:
            return value
        return value / commands[self.denominator].wall

    def shown(self, value: float) -> tuple[str, str]:
        if self.metric == "bytes":
            return f"{value:.3f} of the budget", f"<= {self.limit:g}"
        if self.denominator is None:
            return f"{value:.1f} MB", f"<= {self.limit:g} MB"
        return f"{value:.2f}", f"<= {self.limit:g}"


def goals(big: str = "1 GB") -> list[Goal]:
    found = []
    for fmt, name in (("pt", ".pt"), ("st", ".safetensors")):
        found.append(
            Goal(
                f"`inspect` {big} / 1 MB ({name})",
                f"inspect-big-{fmt}",
                f"inspect-small-{fmt}",
                1.3,
            )
        )
    found.append(
        Goal(f"`inspect` {big} .pt / `import torch`", "inspect-big-pt", "import-torch", 0.5)
    )
    for fmt, name in (("pt", ".pt"), ("st", ".safetensors")):
        found.append(
            Goal(f"`set-forget-bias -o` {big} / `cp` ({name})", f"sfb-o-{fmt}", f"cp-{fmt}", 1.5)
        )
    for fmt, name in (("pt", ".pt"), ("st", ".safetensors")):
        found.append(
            Goal(
                f"`set-forget-bias --in-place` {big} / 1 MB ({name})",
                f"sfb-ip-big-{fmt}",
                f"sfb-ip-small-{fmt}",
                1.3,
            )
        )
    found.append(
        Goal(f"peak RSS of `set-forget-bias -o` {big} .safetensors", "sfb-o-st", None, 150, "rss")
    )
    found.append(
        Goal(
            f"`inspect` {big} in {SHARDS} shards / the same as one file",
            "inspect-sharded",
            "inspect-split",
            1.3,
        )
    )
    found.append(
        Goal(
            f"`set-forget-bias --in-place` {big} in {SHARDS} shards / 1 MB (one .safetensors)",
            "sfb-ip-sharded",
            "sfb-ip-small-st-vs-sharded",
            1.3,
        )
    )
    found.append(Goal("`lstm-surgeon --help` / `python -c pass`", "help", "python-pass", 3))
    found.append(
        Goal(
            f"bytes fetched by `inspect` of a remote {big} .safetensors over HTTP / "
            "(header + recurrent tensors + 1 MB)",
            "inspect-remote-st",
            None,
            1.0,
            "bytes",
        )
    )
    for fmt, name in (("pt", ".pt"), ("st", ".safetensors")):
        found.append(
            Goal(
                f"`inspect` of {MANY} small {name} in one call / of one",
                f"inspect-many-{fmt}",
                f"inspect-one-{fmt}",
                20,
            )
        )
    return found


# --- Main -------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> int:
    if not Path(SURGEON).exists():
        sys.exit(f"{SURGEON} not found: install the package (pip install -e .) in this venv")
    ensure_data(args.size_mb, args.regenerate)
    big, small = big_stem(args.size_mb), small_stem()
    files = {
        (size, fmt): DATA / f"{stem}{suffix}"
        for size, stem in (("big", big), ("small", small))
        for fmt, suffix in (("pt", ".pt"), ("st", ".safetensors"))
    }
    suffix_of = {"pt": ".pt", "st": ".safetensors"}
    sizes = {path.name: path.stat().st_size for path in files.values()}
    load_before = os.getloadavg()
    work: list[Path] = []  # files this run creates and removes (outputs, in-place copies)
    commands: dict[str, Command] = {}

    def add(command: Command) -> Command:
        commands[command.key] = command
        return command

    def fixed(*argv: str | Path) -> Callable[[int], list[str]]:
        return lambda run: [str(part) for part in argv]

    started = time.perf_counter()
    try:
        # 1. inspect: 1 GB vs 1 MB, and vs importing torch.
        group = [
            add(
                Command(
                    f"inspect-{size}-{fmt}", f"inspect {path.name}", fixed(SURGEON, "inspect", path)
                )
            )
            for (size, fmt), path in files.items()
        ]
        group.append(
            add(
                Command(
                    "import-torch", "python -c 'import torch'", fixed(PYTHON, "-c", "import torch")
                )
            )
        )
        measure_group("inspect", group, list(files.values()), args.repeat)

        # 2. set-forget-bias -o vs cp (and the durable variants, -o --fsync vs cp + sync, for
        # context), on the 1 GB files.
        group = []
        for fmt in ("pt", "st"):
            source = files[("big", fmt)]
            out = DATA / f"out-sfb{suffix_of[fmt]}"
            copy = DATA / f"out-cp{suffix_of[fmt]}"
            work += [out, copy]
            sanity_check_edit([SURGEON, "set-forget-bias", str(source), "-o", str(out)])
            group += [
                add(
                    Command(
                        f"sfb-o-{fmt}",
                        f"set-forget-bias {source.name} -o",
                        fixed(SURGEON, "set-forget-bias", source, "-o", out),
                        setup=unlink_and_sync(out),
                    )
                ),
                add(
                    Command(
                        f"sfb-o-fsync-{fmt}",
                        f"set-forget-bias {source.name} -o --fsync",
                        fixed(SURGEON, "set-forget-bias", source, "-o", out, "--fsync"),
                        setup=unlink_and_sync(out),
                    )
                ),
                add(
                    Command(
                        f"cp-{fmt}",
                        f"cp {source.name}",
                        fixed("cp", source, copy),
                        setup=unlink_and_sync(copy),
                    )
                ),
                add(
                    Command(
                        f"cp-sync-{fmt}",
                        f"cp {source.name} && sync (fsync) the copy",
                        fixed("sh", "-c", 'cp "$0" "$1" && sync "$1"', source, copy),
                        setup=unlink_and_sync(copy),
                    )
                ),
            ]
        measure_group(
            "set-forget-bias -o vs cp (1 GB)",
            group,
            [files[("big", f)] for f in ("pt", "st")],
            args.repeat,
        )
        unlink(*work)()

        # 3. set-forget-bias --in-place: 1 GB vs 1 MB, on working copies (values alternate, so every
        # run really patches).
        group = []
        copies = []
        for (size, fmt), path in files.items():
            copy = DATA / f"inplace-{path.name}"
            shutil.copyfile(path, copy)
            work.append(copy)
            copies.append(copy)

            def argv(run: int, copy: Path = copy) -> list[str]:
                value = "1.0" if run % 2 == 0 else "1.5"
                return [
                    SURGEON,
                    "set-forget-bias",
                    str(copy),
                    "--in-place",
                    "--yes",
                    "--value",
                    value,
                ]

            command = add(
                Command(f"sfb-ip-{size}-{fmt}", f"set-forget-bias {path.name} --in-place", argv)
            )
            sanity_check_edit(command.argv(command.runs))
            command.runs += 1
            group.append(command)
        os.sync()
        measure_group("set-forget-bias --in-place: 1 GB vs 1 MB", group, copies, args.repeat)

        # 3b. Sharded: inspect 10 shards vs the same tensors in one file; an in-place edit of the
        # 10 shards vs one of the 1 MB file (measured again, side by side).
        measure_sharded(args, add, fixed, commands["sfb-ip-small-st"])

        # 4. Start-up: --help vs an empty interpreter.
        group = [
            add(Command("help", "lstm-surgeon --help", fixed(SURGEON, "--help"))),
            add(Command("python-pass", "python -c pass", fixed(PYTHON, "-c", "pass"))),
        ]
        measure_group("start-up", group, [], args.repeat)

        # 5. Context: the naive torch.load + slice + torch.save on the 1 GB .pt (no warm-up run).
        naive = DATA / "naive_set_forget_bias.py"
        naive.write_text(NAIVE_SCRIPT)
        naive_out = DATA / "out-naive.pt"
        work.append(naive_out)
        group = [
            add(
                Command(
                    "naive-pt",
                    "naive torch.load + slice + torch.save (.pt)",
                    fixed(PYTHON, naive, files[("big", "pt")], naive_out),
                    setup=unlink_and_sync(naive_out),
                    warmup=False,
                )
            )
        ]
        measure_group("naive baseline (context)", group, [files[("big", "pt")]], args.repeat)

        # 6. Many checkpoints in one call: MANY hard links to the 1 MB files (a run's checkpoints).
        folder = Path(tempfile.mkdtemp(prefix="many-", dir=DATA))
        work.append(folder)
        group = []
        for fmt in ("pt", "st"):
            small_file = files[("small", fmt)]
            for index in range(MANY):
                os.link(small_file, folder / f"{index:03d}{suffix_of[fmt]}")
            pattern = str(folder / f"*{suffix_of[fmt]}")
            group += [
                add(
                    Command(
                        f"inspect-many-{fmt}",
                        f"inspect '*{suffix_of[fmt]}' ({MANY} files of 1 MB)",
                        fixed(SURGEON, "inspect", pattern, "--json"),
                    )
                ),
                add(
                    Command(
                        f"inspect-one-{fmt}",
                        f"inspect {small_file.name} --json",
                        fixed(SURGEON, "inspect", small_file, "--json"),
                    )
                ),
            ]
        measure_group(f"{MANY} checkpoints in one call vs one", group, [], args.repeat)

        # 7. inspect over HTTP (a range-honouring server on 127.0.0.1): the bytes it fetches.
        big_st = files[("big", "st")]
        with serve(DATA) as (url, state):
            group = [
                add(
                    Command(
                        "inspect-remote-st",
                        f"inspect {url}/{big_st.name}",
                        fixed(SURGEON, "inspect", f"{url}/{big_st.name}"),
                        server=state,
                        budget=remote_budget(big_st),
                    )
                )
            ]
            measure_group("inspect of a remote .safetensors over HTTP", group, [], args.repeat)
    finally:
        remove(work)
        if not args.keep:
            unlink(*(DATA / f"{big}{suffix}" for suffix in (".pt", ".safetensors")))()
            single, folder = sharded_paths(args.size_mb)
            unlink(single)()
            shutil.rmtree(folder, ignore_errors=True)
    return report(args, commands, sizes, load_before, time.perf_counter() - started)


def measure_sharded(
    args: argparse.Namespace,
    add: Callable[[Command], Command],
    fixed: Callable[..., Callable[[int], list[str]]],
    small_edit: Command,
) -> None:
    """Inspect and edit the sharded folder beside their one-file and 1 MB counterparts. The folder
    is edited where it lies (values alternate; it stays a valid checkpoint for the next run)."""
    ensure_sharded(args.size_mb, args.regenerate)
    single, folder = sharded_paths(args.size_mb)
    inputs = [single, *sorted(folder.iterdir())]
    group = [
        add(Command("inspect-split", f"inspect {single.name}", fixed(SURGEON, "inspect", single))),
        add(
            Command(
                "inspect-sharded",
                f"inspect {folder.name}/ ({SHARDS} shards)",
                fixed(SURGEON, "inspect", folder),
            )
        ),
    ]
    measure_group(f"inspect: {SHARDS} shards vs one file", group, inputs, args.repeat)

    def argv(run: int) -> list[str]:
        value = "1.0" if run % 2 == 0 else "1.5"
        return [SURGEON, "set-forget-bias", str(folder), "--in-place", "--yes", "--value", value]

    edit = add(Command("sfb-ip-sharded", f"set-forget-bias {folder.name}/ --in-place", argv))
    sanity_check_edit(edit.argv(edit.runs))
    edit.runs += 1
    small = add(  # the 1 MB edit again, measured side by side with this one
        Command(
            "sfb-ip-small-st-vs-sharded",
            small_edit.label,
            small_edit.argv,
            runs=small_edit.runs,  # continues its alternation, so every run really patches
        )
    )
    os.sync()
    measure_group(
        f"set-forget-bias --in-place: {SHARDS} shards vs 1 MB", [edit, small], inputs, args.repeat
    )


def report(
    args: argparse.Namespace,
    commands: dict[str, Command],
    sizes: dict[str, int],
    load_before: tuple[float, float, float],
    elapsed: float,
) -> int:
    print(f"\n## Measurements (median of {args.repeat} runs; page cache warm on both sides)\n")
    print("| command | median wall | min … max | median peak RSS |")
    print("| --- | ---: | ---: | ---: |")
    for command in commands.values():
        print(
            f"| {command.label} | {command.wall * 1000:.0f} ms | "
            f"{min(command.walls) * 1000:.0f} … {max(command.walls) * 1000:.0f} ms | "
            f"{command.peak:.0f} MiB |"
        )
    rows = []
    print("\n## Goals\n")
    print("| ratio | measured | goal | result |")
    print("| --- | ---: | ---: | --- |")
    for goal in goals(size_label(max(sizes.values()))):
        value = goal.measured(commands)
        passed = value <= goal.limit
        shown, limit = goal.shown(value)
        print(f"| {goal.name} | {shown} | {limit} | {'pass' if passed else 'FAIL'} |")
        rows.append(
            {
                "goal": goal.name,
                "measured": value,
                "limit": goal.limit,
                "metric": goal.metric,
                "numerator": goal.numerator,
                "denominator": goal.denominator,
                "pass": passed,
            }
        )
    context = {
        "sfb -o --fsync / (cp + sync), .pt": commands["sfb-o-fsync-pt"].wall
        / commands["cp-sync-pt"].wall,
        "sfb -o --fsync / (cp + sync), .safetensors": commands["sfb-o-fsync-st"].wall
        / commands["cp-sync-st"].wall,
        "naive .pt: wall s": commands["naive-pt"].wall,
        "naive .pt: peak RSS MiB": commands["naive-pt"].peak,
    }
    print("\n## Context (no goal)\n")
    for name, value in context.items():
        print(f"- {name}: {value:.2f}")
    print(
        "\nNotes: nothing was dropped from the page cache; every input was read once before timing "
        "and each command ran once untimed first, so both sides run warm. `-o` outputs were deleted "
        "and `sync` called before each run (outside the timed region). Like `cp`, a plain `-o` does "
        "not fsync; `-o --fsync` is compared with `cp && sync` in the context rows. "
        f"Peak RSS: {RSS_SOURCE}."
    )
    print(
        "Load average (1/5/15 min) before: "
        + " ".join(f"{x:.2f}" for x in load_before)
        + ", after: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + f" on {os.cpu_count()} CPUs."
    )
    document = {
        "size_mb": args.size_mb,
        "repeat": args.repeat,
        "elapsed_s": elapsed,
        "python": sys.version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "files": sizes,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "measurements": {key: command.to_dict() for key, command in commands.items()},
        "goals": rows,
        "context": context,
        "page_cache": "warm (inputs read once before timing; nothing dropped)",
        "peak_rss_source": RSS_SOURCE,
    }
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {RESULTS.relative_to(HERE.parent)}")
    failed = [row for row in rows if not row["pass"]]
    return 1 if failed and args.strict else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1000, help="size of the big files (MB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per command (median)")
    parser.add_argument("--keep", action="store_true", help="keep the big files for later runs")
    parser.add_argument(
        "--regenerate", action="store_true", help="rebuild the files even if present"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    parser.add_argument("--generate-only", metavar="STEM", help=argparse.SUPPRESS)
    parser.add_argument("--generate-sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate_only:
        generate(args.generate_only, args.size_mb)
        return 0
    if args.generate_sharded:
        generate_sharded(args.size_mb)
        return 0
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
