"""Side by side with vLLM: ``adapterhub serve`` and vLLM's OpenAI server, one base, one LoRA workload.

Both servers serve the same base folder and the same LoRA adapters (PEFT ``save_pretrained``, random
non-trivial weights, ranks cycling over ``--ranks`` on all seven projections) with the same limits:
fp32, the same OpenMP thread count, the same largest batch (adapterhub's ``max_batch_size``,
vLLM's ``--max-num-seqs``), context length and number of device adapter slots. The script

1. checks exactness: greedy completions of a few token-id prompts for the base and every adapter,
   from both servers, against plain PEFT's greedy tokens (a fresh base for every PeftModel); a
   completion may part from PEFT's only where PEFT's own logprobs tie the two tokens to 1e-3;
2. runs ``adapterhub bench http --url`` with one workload against each server in turn, ``--pairs``
   times, alternating which goes first, and reports each server's output tok/s, the paired median
   ratio adapterhub / vLLM, the load averages and each server's CPU seconds during every run.

vLLM lives in its own virtual environment (``--vllm-python``); adapterhub runs in this Python.
From the repository root:

    PYTHONPATH=$PWD python3 benchmarks/vllm_side_by_side.py --vllm-python /work/vllm-venv/bin/python

prints one JSON object on stdout (progress on stderr). It asserts nothing about speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import httpx

TARGET_RATIO = 1.2  # issue 17: adapterhub's output tok/s over vLLM's on the same workload
LOGPROB_TOLERANCE = 1e-3  # fp32 kernels of three implementations agree far closer than this
STARTUP_TIMEOUT_S = 900
SHAPES = ("toy", "smollm2-360m")


@dataclass(frozen=True)
class Workload:
    """What both servers are asked: one ``bench http`` round, and the exactness prompts."""

    requests: int = 256
    concurrency: int = 16
    prompt_len: int = 32
    new_tokens: int = 32
    stream: bool = True
    exact_prompts: int = 3
    exact_tokens: int = 16


@dataclass(frozen=True)
class Limits:
    """The serving limits both servers get, so neither batches, caches or threads more."""

    threads: int
    max_batch: int
    max_context: int
    adapter_slots: int
    max_lora_rank: int


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    url: str
    log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)


# -- pure helpers (tests/benchmarks/test_vllm_side_by_side.py) ---------------------------------------


def adapter_ranks(count: int, ranks: list[int]) -> list[int]:
    """Ranks cycling over ``ranks``: 8 adapters over [8, 16] are 8, 16, 8, 16, ..."""
    return [ranks[i % len(ranks)] for i in range(count)]


def vllm_lora_rank(widest: int) -> int:
    """vLLM's ``--max-lora-rank`` takes only these values; the smallest that holds the widest rank."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if allowed >= widest:
            return allowed
    raise ValueError(f"rank {widest} is above vLLM's largest --max-lora-rank (512)")


def thread_env(threads: int) -> dict[str, str]:
    """The same OpenMP/MKL thread count for both servers' processes."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def adapterhub_server(
    python: str, base: Path, adapters: dict[str, Path], port: int, limits: Limits
) -> list[str]:
    specs = ",".join(f"{name}={folder}" for name, folder in adapters.items())
    return [
        python, "-m", "adapterhub", "serve", "--base", str(base), "--adapters", specs,
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--quantize", "none",
        "--max-adapters", str(limits.adapter_slots),
    ]  # fmt: skip


def vllm_server(python: str, base: Path, adapters: dict[str, Path], port: int, limits: Limits) -> list[str]:
    """vLLM's OpenAI server with adapterhub's limits. Prefix caching is off: ``bench http`` sends the
    same prompts in every round, which a prefix cache would answer without prefill."""
    return [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--dtype", "float32",
        "--enable-lora", "--lora-modules", *(f"{name}={folder}" for name, folder in adapters.items()),
        "--max-lora-rank", str(vllm_lora_rank(limits.max_lora_rank)),
        "--max-loras", str(limits.adapter_slots),
        "--max-num-seqs", str(limits.max_batch), "--max-model-len", str(limits.max_context),
        "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def omp_cores(threads: int, allowed: list[int]) -> str:
    """The first ``threads`` cores this process may run on, as vLLM's bind list ("0-1", "0")."""
    if threads > len(allowed):
        raise click.BadParameter(f"{threads} threads on {len(allowed)} cores", param_hint="--threads")
    return ",".join(str(core) for core in sorted(allowed)[:threads])


def vllm_env(threads: int, allowed_cores: list[int], preload: list[str]) -> dict[str, str]:
    """vLLM's CPU worker pins its OpenMP threads to ``VLLM_CPU_OMP_THREADS_BIND``; its default "auto"
    keeps one core for its scheduler process (one thread on 2 cores), so the list is given."""
    env = {
        **thread_env(threads),
        "VLLM_CPU_OMP_THREADS_BIND": omp_cores(threads, allowed_cores),
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the workload needs a few MiB
    }
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def greedy_body(model: str, prompt: list[int], tokens: int) -> dict:
    """One greedy completion both servers understand; special tokens stay in the text."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "skip_special_tokens": False,
        "logprobs": 0,
    }


def compare_choice(
    choice: dict,
    reference_ids: list[int],
    reference_logprobs: list[float],
    pieces: list[str],
    text: str,
    ties: list[list[tuple[int, str, float]]] | None = None,
) -> dict:
    """One served choice against PEFT's greedy tokens.

    vLLM returns the token ids (``return_token_ids``); adapterhub returns token texts, where two
    partial UTF-8 byte tokens can read the same, so a row whose ids are not returned also needs every
    token's logprob to be PEFT's (a different token would have to tie PEFT's choice to 1e-3).

    A served token that is not PEFT's choice is still exact where PEFT's own logprobs tie the two to
    ``LOGPROB_TOLERANCE`` (``ties``: per position, the other tokens that close to PEFT's choice, as
    (id, piece, logprob)), as vLLM's ``check_logprobs_close`` accepts: two fp32 implementations may
    break a tie either way. Nothing after the tie is compared, since the two continuations differ."""
    served_logprobs = list(choice["logprobs"]["token_logprobs"])
    by_ids = "token_ids" in choice and choice["token_ids"] is not None
    served = list(choice["token_ids"]) if by_ids else list(choice["logprobs"]["tokens"])
    wanted: list = reference_ids if by_ids else pieces
    expected = list(reference_logprobs)
    first = next((i for i, (a, b) in enumerate(zip(served, wanted, strict=False)) if a != b), None)
    tie_at = None
    if first is not None and ties is not None:
        tied = {(token if by_ids else piece): logprob for token, piece, logprob in ties[first]}
        if served[first] in tied:
            tie_at = first
            expected = [*expected[:first], tied[served[first]]]
            served_logprobs = served_logprobs[: first + 1]
    diffs = [abs(a - b) for a, b in zip(served_logprobs, expected, strict=False)]
    logprob_diff = max(diffs) if len(served_logprobs) == len(expected) else float("inf")
    if by_ids:
        checked, tokens_equal = "token ids", served == reference_ids
    else:
        checked = "token texts and logprobs"
        tokens_equal = served == pieces and logprob_diff <= LOGPROB_TOLERANCE
    return {
        "tokens_equal": tokens_equal,
        "tie_at": tie_at,
        "exact": tokens_equal or (tie_at is not None and logprob_diff <= LOGPROB_TOLERANCE),
        "checked": checked,
        "text_equal": choice["text"] == text,
        "max_abs_logprob_diff": logprob_diff,
    }


def summarize_exactness(rows: dict[str, list[dict]]) -> dict:
    """Per model: exact when every prompt's tokens equal PEFT's, or part from them only at a tie
    (``ties_taken`` counts those prompts); the largest logprob difference."""
    return {
        model: {
            "exact": all(row["exact"] for row in checks),
            "prompts": len(checks),
            "ties_taken": sum(row["tie_at"] is not None for row in checks),
            "checked": checks[0]["checked"],
            "text_equal": all(row["text_equal"] for row in checks),
            "max_abs_logprob_diff": float(f"{max(row['max_abs_logprob_diff'] for row in checks):.3g}"),
        }
        for model, checks in rows.items()
    }


def paired_ratio(runs: list[dict], numerator: str, denominator: str) -> tuple[float, list[float]]:
    """The median of each pair's tok/s ratio, and every pair's ratio, in pair order."""
    by_pair: dict[int, dict[str, float]] = {}
    for run in runs:
        by_pair.setdefault(run["pair"], {})[run["server"]] = run["http_tok_s"]
    each = [pair[numerator] / pair[denominator] for _, pair in sorted(by_pair.items())]
    return round(statistics.median(each), 3), [round(ratio, 3) for ratio in each]


def pair_order(pair: int) -> tuple[str, str]:
    """Alternate which server goes first, so a drift in machine load favours neither."""
    return ("adapterhub", "vllm") if pair % 2 == 0 else ("vllm", "adapterhub")


# -- the machine -------------------------------------------------------------------------------------


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live process under it (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in members]
        members.update(children)
        frontier += children
    return sum(times.get(pid, 0.0) for pid in members)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(vllm_python: str) -> dict:
    import peft
    import torch
    import transformers

    probe = (
        "import json, torch, transformers, vllm; print(json.dumps({'vllm': vllm.__version__, "
        "'vllm_torch': torch.__version__, 'vllm_transformers': transformers.__version__}))"
    )
    found = subprocess.run([vllm_python, "-c", probe], capture_output=True, text=True, timeout=600)
    if found.returncode != 0:
        raise click.ClickException(
            f"{vllm_python} cannot import vllm: {found.stderr.strip().splitlines()[-1:]}"
        )
    return {
        "adapterhub_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **json.loads(found.stdout.strip().splitlines()[-1]),
    }


# -- building the base and the adapters --------------------------------------------------------------


def base_config(shape: str):
    """A Llama with head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...), in fp32."""
    from transformers import LlamaConfig

    from adapterhub.tiny import VOCAB_SIZE

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if shape == "toy":
        return LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    from adapterhub.models import load_config

    # SmolLM2-360M's widths, depth, heads and vocabulary (the shipped config), random weights; the
    # context is cut to 2,048 so that both servers allocate the same modest KV cache.
    config = load_config("HuggingFaceTB/SmolLM2-360M-Instruct")
    config.max_position_embeddings = 2048
    for key, value in ids.items():
        setattr(config, key, value)
    return config


def build_base(shape: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from adapterhub.tiny import build_tokenizer

    if (folder / "config.json").exists():
        return folder
    config = base_config(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    model.save_pretrained(folder)
    tokenizer = build_tokenizer() if shape == "toy" else word_tokenizer(config.vocab_size)
    tokenizer.save_pretrained(folder)
    return folder


def word_tokenizer(size: int):
    """A tokenizer with exactly ``size`` tokens (SmolLM2's own cannot be downloaded here): the local
    BPE's special tokens, then the words `` w7``, `` w8``, ... (byte-level, as GPT-2 spells a leading
    space), so that every token is distinct, valid text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adapterhub.tiny import SPECIAL_TOKENS

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"\u0120w{index}": index for index in range(len(SPECIAL_TOKENS), size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_adapters(base: Path, ranks: list[int], root: Path) -> dict[str, Path]:
    """One PEFT LoRA per rank, each written from a freshly loaded base."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

    adapters = {}
    for index, rank in enumerate(ranks):
        folder = root / f"lora{index}-r{rank}"
        if not (folder / "adapter_config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            write_random_adapter(model, peft_config("lora", rank=rank), folder, seed=1000 + index)
        adapters[folder.name] = folder
    return adapters


def exact_prompts(vocab: int, workload: Workload) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(17)
    shape = (workload.exact_prompts, workload.prompt_len)
    return torch.randint(3, vocab, shape, generator=generator).tolist()


Reference = tuple[list[int], list[float], list[list[tuple[int, float]]]]


def peft_references(
    base: Path, adapters: dict[str, Path | None], prompts: list[list[int]], tokens: int
) -> dict[str, list[Reference]]:
    """Plain PEFT's greedy tokens and their logprobs, EOS ignored, one fresh base per adapter; and at
    each position the other tokens within ``LOGPROB_TOLERANCE`` of the greedy one (ties)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    references = {}
    for name, folder in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if folder is not None:
            model = PeftModel.from_pretrained(model, folder)
        model.eval()
        rows = []
        with torch.no_grad():
            for prompt in prompts:
                out = model(input_ids=torch.tensor([prompt]), use_cache=True)
                ids, logprobs, ties = [], [], []
                for _ in range(tokens):
                    step = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                    token = int(step.argmax())
                    ids.append(token)
                    logprobs.append(float(step[token]))
                    close = (step >= step[token] - LOGPROB_TOLERANCE).nonzero().flatten().tolist()
                    ties.append([(other, float(step[other])) for other in close if other != token])
                    out = model(
                        input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                    )
                rows.append((ids, logprobs, ties))
        references[name] = rows
        del model
    return references


# -- the servers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Start ``server`` in its own process group, wait until it lists its models, stop the group after."""
    with server.log.open("w") as log:
        server.process = subprocess.Popen(
            server.command,
            env={**os.environ, **server.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if server.process.poll() is not None:
                tail = "\n".join(server.log.read_text().splitlines()[-15:])
                raise click.ClickException(
                    f"{server.name} exited with {server.process.returncode} before serving:\n{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise click.ClickException(
                    f"{server.name} did not answer in {STARTUP_TIMEOUT_S} s: {server.log}"
                )
            time.sleep(2)
        yield server
    finally:
        stop(server.process)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # children left behind by a crashed parent
        os.killpg(process.pid, signal.SIGKILL)


def check_exactness(
    server: Server,
    references: dict[str, list[Reference]],
    prompts: list[list[int]],
    served_names: dict[str, str],
    tokenizer,
) -> dict:
    def decode(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False)

    rows: dict[str, list[dict]] = {}
    with httpx.Client(timeout=600) as http:
        for name, expected in references.items():
            rows[name] = []
            for prompt, (ids, logprobs, ties) in zip(prompts, expected, strict=True):
                body = greedy_body(served_names[name], prompt, len(ids))
                if server.name == "vllm":
                    body["return_token_ids"] = True
                response = http.post(f"{server.url}/v1/completions", json=body)
                response.raise_for_status()
                pieces = [decode(token) for token in ids]
                text = tokenizer.decode(ids, skip_special_tokens=False)
                tied = [[(t, decode(t), logprob) for t, logprob in step] for step in ties]
                choice = response.json()["choices"][0]
                rows[name].append(compare_choice(choice, ids, logprobs, pieces, text, tied))
    return summarize_exactness(rows)


def bench_round(server: Server, other: Server, base: Path, models: list[str], workload: Workload) -> dict:
    """One ``adapterhub bench http --url`` run (its own warm-up, then one timed round) at ``server``."""
    command = [
        sys.executable, "-m", "adapterhub", "bench", "http", "--url", server.url, "--base", str(base),
        "--models", ",".join(models), "--requests", str(workload.requests),
        "--concurrency", str(workload.concurrency), "--prompt-len", str(workload.prompt_len),
        "--new-tokens", str(workload.new_tokens), "--json",
        *([] if workload.stream else ["--no-stream"]),
    ]  # fmt: skip
    load_before = os.getloadavg()
    own_before, other_before = tree_cpu_seconds(server.process.pid), tree_cpu_seconds(other.process.pid)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **thread_env(1)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise click.ClickException(f"bench http against {server.name} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    return {
        "server": server.name,
        "http_tok_s": result["http_tok_s"],
        "tokens": result["http_tokens"],
        "latency_p50_ms": result["http_latency_p50_ms"],
        "latency_p95_ms": result["http_latency_p95_ms"],
        "ttft_p50_ms": result.get("http_ttft_p50_ms"),
        "command_wall_s": round(wall, 1),
        "server_cpu_s": round(tree_cpu_seconds(server.process.pid) - own_before, 1),
        "other_server_cpu_s": round(tree_cpu_seconds(other.process.pid) - other_before, 1),
        "load_avg_before": [round(value, 2) for value in load_before],
        "load_avg_after": [round(value, 2) for value in os.getloadavg()],
    }


# -- the command -------------------------------------------------------------------------------------


def preload_libraries(vllm_python: str) -> list[str]:
    """What vLLM's CPU docs ask to preload: tcmalloc, and Intel's OpenMP from its venv, when present."""
    found = []
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    ):
        if Path(candidate).exists():
            found.append(candidate)
            break
    iomp = Path(vllm_python).resolve().parent.parent / "lib" / "libiomp5.so"
    if not iomp.exists():
        iomp = Path(vllm_python).absolute().parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


def run(
    *,
    vllm_python: str,
    shape: str,
    adapters: int,
    ranks: list[int],
    pairs: int,
    threads: int,
    preload: bool,
    workload: Workload,
    work_dir: Path,
    progress: Callable[[str], None],
) -> dict:
    from adapterhub.models import load_tokenizer
    from adapterhub.runtime.engine import DEFAULT_MAX_CONTEXT, EngineConfig

    found_versions = versions(vllm_python)
    progress(f"building the {shape} base and {adapters} PEFT LoRA adapters in {work_dir}")
    base = build_base(shape, work_dir / f"base-{shape}")
    rank_list = adapter_ranks(adapters, ranks)
    lora = build_adapters(base, rank_list, work_dir / f"adapters-{shape}")
    config = base_config(shape)
    limits = Limits(
        threads=threads,
        max_batch=EngineConfig().max_batch_size,
        max_context=min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT),
        adapter_slots=adapters,
        max_lora_rank=max(rank_list),
    )
    prompts = exact_prompts(config.vocab_size, workload)
    progress("plain PEFT's greedy tokens, a fresh base per adapter")
    references = peft_references(base, {"base": None, **lora}, prompts, workload.exact_tokens)
    tokenizer = load_tokenizer(str(base))
    served_names = {"base": str(base), **{name: name for name in lora}}

    hub_port, vllm_port = free_port(), free_port()
    hub = Server(
        "adapterhub",
        adapterhub_server(sys.executable, base, lora, hub_port, limits),
        thread_env(threads),
        f"http://127.0.0.1:{hub_port}",
        work_dir / "adapterhub-serve.log",
    )
    vllm = Server(
        "vllm",
        vllm_server(vllm_python, base, lora, vllm_port, limits),
        vllm_env(threads, sorted(os.sched_getaffinity(0)), preload_libraries(vllm_python) if preload else []),
        f"http://127.0.0.1:{vllm_port}",
        work_dir / "vllm-serve.log",
    )
    load_start = os.getloadavg()
    progress("starting adapterhub serve and vLLM")
    with running(hub), running(vllm):
        progress("exactness: both servers against PEFT")
        exactness = {
            server.name: check_exactness(server, references, prompts, served_names, tokenizer)
            for server in (hub, vllm)
        }
        servers = {"adapterhub": hub, "vllm": vllm}
        runs = []
        for pair in range(pairs):
            for name in pair_order(pair):
                progress(f"pair {pair + 1}/{pairs}: bench http against {name}")
                other = vllm if name == "adapterhub" else hub
                runs.append({"pair": pair, **bench_round(servers[name], other, base, list(lora), workload)})
    ratio, each = paired_ratio(runs, "adapterhub", "vllm")
    rates = {name: [run["http_tok_s"] for run in runs if run["server"] == name] for name in servers}
    return {
        "benchmark": "vllm_side_by_side",
        "ratio_adapterhub_over_vllm": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "adapterhub_tok_s": round(statistics.median(rates["adapterhub"]), 2),
        "vllm_tok_s": round(statistics.median(rates["vllm"]), 2),
        "ratio_each_pair": each,
        "all_exact": all(row["exact"] for server in exactness.values() for row in server.values()),
        "exactness": exactness,
        "runs": runs,
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "load_avg_start": [round(value, 2) for value in load_start],
            "load_avg_end": [round(value, 2) for value in os.getloadavg()],
        },
        "versions": found_versions,
        "base": {
            "shape": shape,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.hidden_size // config.num_attention_heads,
            "vocab_size": config.vocab_size,
            "dtype": "float32",
        },
        "adapters": [{"name": name, "rank": rank} for name, rank in zip(lora, rank_list, strict=True)],
        "workload": {**asdict(workload), "models": "the adapters, round-robin", "pairs": pairs},
        "limits": asdict(limits),
        "servers": {server.name: {"command": server.command, "env": server.env} for server in (hub, vllm)},
    }


@click.command()
@click.option(
    "--vllm-python", required=True, help="the python of vLLM's own venv, e.g. /work/vllm-venv/bin/python"
)
@click.option("--shape", type=click.Choice(SHAPES), default="toy", show_default=True)
@click.option("--adapters", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--ranks", default="8,16", show_default=True, help="LoRA ranks, cycled over the adapters")
@click.option("--pairs", default=8, show_default=True, type=click.IntRange(min=1), help="alternations")
@click.option("--threads", default=os.cpu_count(), show_default=True, type=click.IntRange(min=1))
@click.option("--requests", default=Workload.requests, show_default=True, type=click.IntRange(min=1))
@click.option("--concurrency", default=Workload.concurrency, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-len", default=Workload.prompt_len, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=Workload.new_tokens, show_default=True, type=click.IntRange(min=1))
@click.option("--stream/--no-stream", default=True, show_default=True)
@click.option(
    "--vllm-preload/--no-vllm-preload",
    default=True,
    show_default=True,
    help="LD_PRELOAD tcmalloc and Intel OpenMP for vLLM, as its CPU docs advise",
)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), help="keep the models here")
def main(
    vllm_python: str,
    shape: str,
    ranks: str,
    work_dir: Path | None,
    vllm_preload: bool,
    requests: int,
    concurrency: int,
    prompt_len: int,
    new_tokens: int,
    stream: bool,
    **options,
) -> None:
    """Exactness against PEFT, then paired tok/s, of adapterhub serve and vLLM on one LoRA workload."""
    from adapterhub.bench import phases

    try:
        rank_list = [int(rank) for rank in ranks.split(",") if rank.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{ranks!r} is not a comma-separated list of ranks", param_hint="--ranks"
        ) from None
    workload = Workload(
        requests=requests,
        concurrency=concurrency,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        stream=stream,
    )
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm-side-by-side-")))
        work_dir.mkdir(parents=True, exist_ok=True)
        with phases("vllm side by side") as progress:
            result = run(
                vllm_python=vllm_python,
                shape=shape,
                ranks=rank_list,
                preload=vllm_preload,
                workload=workload,
                work_dir=work_dir,
                progress=progress,
                **options,
            )
    click.echo(json.dumps({"command": sys.argv, **result}, indent=2))


if __name__ == "__main__":
    main()
