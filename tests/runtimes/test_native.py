"""The native runtime (runtimes/native, C++ on onnxruntime's C API) against the Python runtime on the same bundles:
the same greedy tokens token for token (fp32 and int8, prompts shorter and longer than one call, experts none, one,
two and routed), the same routing answers with every router, switching through the C API within a budget without
growing memory, and the refusals (bad checksum, another base, missing pack, bad options) as one line with exit 2.

`make test` builds it first (`make native`); the `native` fixture (conftest) builds it too, so the tests never run
an old binary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from mode_edge.runtimes.session import Session
from tests.damage import flip

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "native"
ORT_LIB = next(p for p in (Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
MB = 1 << 20


def run_native(binary: Path, bundle: Path, ids: list[int], *args: str, json_out: Path | None = None,
               ort_lib: Path = ORT_LIB):  # fmt: skip
    """(exit code, new token ids, stderr, profile) of `mode-edge-native run`."""
    cmd = [str(binary), "run", str(bundle), *(["--ids", ",".join(map(str, ids))] if ids else []), "--threads", "2",
           *args]  # fmt: skip
    if json_out:
        cmd += ["--json", str(json_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MODE_EDGE_ORT_LIB": str(ort_lib)})
    tokens = [int(t) for t in proc.stdout.split()]
    profile = json.loads(json_out.read_text()) if json_out and proc.returncode == 0 else None
    return proc.returncode, tokens, proc.stderr, profile


PROMPTS = {n: np.random.default_rng(n).integers(1, 250, n).tolist() for n in (1, 9, 300)}
"""300 tokens: two calls of the graphs (chunks of 256), the second after a cache."""


def python_logits(session: Session, prompt: list[int], experts: list[str], tokens: list[int]) -> np.ndarray:
    """The Python runtime's logits before each of `tokens` (steps, V), fed the same tokens."""
    session.select(experts)
    engine = session.engine
    cache = engine.new_cache(len(prompt) + len(tokens))
    steps = [engine.forward(np.array([prompt], dtype=np.int64), cache, last_only=True)[0, -1]]
    for token in tokens[:-1]:
        steps.append(engine.forward(np.array([[token]], dtype=np.int64), cache)[0, -1])
    return np.stack(steps)


@pytest.mark.parametrize("which", ["fp32", "int8"])
@pytest.mark.parametrize("experts", ["none", "code", "code,prose"])
def test_native_tokens_and_logits_are_the_python_runtimes(native, fp32_bundle, int8_bundle, which, experts, tmp_path):
    bundle = fp32_bundle if which == "fp32" else int8_bundle
    session = Session(bundle, threads=2)
    names = [] if experts == "none" else experts.split(",")
    for n, prompt in PROMPTS.items():
        want = list(session.generate(prompt, names, 24))
        code, got, err, _ = run_native(native, bundle, prompt, "--experts", experts, "--max-new-tokens", "24",
                                       "--logits", str(tmp_path / "logits.bin"))  # fmt: skip
        assert code == 0, err
        assert got == want, f"{n}-token prompt"
        logits = np.fromfile(tmp_path / "logits.bin", dtype=np.float32).reshape(len(got), -1)
        reference = python_logits(session, prompt, names, got)
        if which == "fp32":  # the same up to the order of float rounding in the gate's mix
            np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5, err_msg=f"{n}-token prompt")
            continue
        # int8 graphs quantize their activations (accuracy level 4), where a last-bit difference of the mix may move
        # one rounding step, and a step moves what follows it: most logits agree within 5e-4 (measured 1e-5 to
        # 2.4e-4 on one host; on a host with AMX, 2.2% of them by up to 2.5e-3 with two experts), while a wrong mix or
        # cache moves the logits by 1e-3 and more across the board
        diff = np.abs(logits - reference)
        assert np.quantile(diff, 0.95) < 5e-4 and diff.max() < 1e-2, (n, float(np.quantile(diff, 0.95)), diff.max())


@pytest.mark.parametrize("router", ["centroid", "logistic", "gate"])
def test_native_routing_picks_what_the_python_runtime_picks(native, routed_bundle, toy_domains, router, tmp_path):
    from mode_edge.training.backbones import load_backbone

    tokenizer = load_backbone("tiny").tokenizer
    session = Session(routed_bundle, threads=2)
    chosen = set()
    for domain in ("hex", "digits", "general"):
        for line in (toy_domains[domain] / "docs.jsonl").read_text().splitlines()[:3]:
            prompt = tokenizer.encode(json.loads(line)["text"][:200])
            want = session.route(prompt, 1, router)
            code, tokens, err, profile = run_native(native, routed_bundle, prompt, "--router", router,
                                                    "--max-new-tokens", "4", json_out=tmp_path / "p.json")  # fmt: skip
            assert code == 0, err
            assert profile["experts"] == want and profile["router"] == session.last_router == router
            for name, score in session.last_scores.items():
                assert profile["route_scores"][name] == pytest.approx(score, rel=1e-4, abs=1e-4)
            assert tokens == list(session.generate(prompt, want, 4))
            chosen.add(tuple(want))
    assert len(chosen) > 1  # the prompts were routed to different answers, so the comparison could fail


def test_native_profile_has_the_python_schema_and_counts_what_ran(native, int8_bundle, tmp_path):
    from mode_edge.runtimes.engine import Sampling
    from mode_edge.runtimes.run import run

    _, python, _ = run(int8_bundle, ["code"], "def f(x):", 8, Sampling())
    code, tokens, err, profile = run_native(native, int8_bundle, PROMPTS[9], "--experts", "code",
                                            "--max-new-tokens", "8", json_out=tmp_path / "p.json")  # fmt: skip
    assert code == 0, err
    assert set(python) <= set(profile)  # every field of the Python runtime's profile, plus the runtime's own
    assert set(python["memory"]) == set(profile["memory"]) and set(python["load_s"]) == set(profile["load_s"])
    assert profile["new_tokens"] == len(tokens) == 8 and profile["decode_tokens"] == 7
    assert profile["prompt_tokens"] == 9 and profile["experts"] == ["code"] and profile["runtime"] == "native"
    assert set(profile["graph_s"]) == {"embed", "backbone", "experts", "gate+mix", "head"}
    phases = [p["phase"] for p in profile["memory"]["phases"]]
    assert phases[:2] == ["start", "loaded base"] and "loaded expert code" in phases and phases[-1] == "decode done"
    assert profile["memory"]["peak_rss_mb"] >= max(p["rss_mb"] for p in profile["memory"]["phases"])


def test_switching_through_the_c_api_within_a_budget_reloads_and_does_not_grow(native, int8_bundle):
    """A budget that holds one expert: every switch evicts the other and loads anew (the profile says so), the
    tokens are the Python runtime's, and 1,000 switches grow RSS by less than the first 100 left it at + 8 MB."""
    probe = Session(int8_bundle)
    budget = (probe.base_bytes + 1.5 * probe.expert_bytes("code")) / MB
    env = {**os.environ, "MODE_EDGE_ORT_LIB": str(ORT_LIB)}
    proc = subprocess.run([str(BUILD / "switch_loop"), str(int8_bundle), str(budget), "1000", "code", "prose"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["loads"] == 1000  # each generation loaded its expert: the other had been evicted
    want = [list(probe.generate([5, 17, 42, 99], [e], 4)) for e in ("code", "prose")]
    assert out["tokens"] == want
    grown = (out["rss_end_kb"] - out["rss_warm_kb"]) / 1024
    assert grown < 8, f"RSS grew by {grown:.1f} MB over 900 expert switches"


def test_sampling_options_behave_as_documented(native, int8_bundle):
    """top-k 1 at any temperature is greedy; so is a top-p too small for a second token; a seed repeats its draws
    and another seed draws others."""
    prompt = PROMPTS[9]

    def tokens(*args):
        code, got, err, _ = run_native(native, int8_bundle, prompt, "--experts", "code", "--max-new-tokens", "24",
                                       *args)  # fmt: skip
        assert code == 0, err
        return got

    greedy = tokens()
    assert tokens("--temperature", "5", "--top-k", "1", "--seed", "3") == greedy
    assert tokens("--temperature", "5", "--top-p", "1e-9", "--seed", "3") == greedy
    hot = [tokens("--temperature", "5", "--seed", str(seed)) for seed in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2] and hot[0] != greedy


@pytest.mark.parametrize("settings", [("--temperature", "1.5"), ("--temperature", "0.8", "--top-k", "20"),
                                      ("--temperature", "1.2", "--top-p", "0.9")])  # fmt: skip
def test_a_seed_samples_the_python_runtimes_tokens(native, fp32_bundle, settings):
    """One random stream (SplitMix64) and one draw (inverse transform over the running sum) in both runtimes: the
    same seed samples the same tokens, on the fp32 bundle, whose logits agree to 1e-5."""
    from mode_edge.runtimes.engine import Sampling

    options = {k.lstrip("-").replace("-", "_"): float(v) for k, v in zip(settings[::2], settings[1::2])}
    options = {k: int(v) if k == "top_k" else v for k, v in options.items()}
    session = Session(fp32_bundle)
    for seed in (1, 2):
        python = list(session.generate(PROMPTS[9], ["code"], 24, Sampling(**options, seed=seed)))
        code, tokens, err, _ = run_native(native, fp32_bundle, PROMPTS[9], "--experts", "code", "--max-new-tokens",
                                          "24", "--seed", str(seed), *settings)  # fmt: skip
        assert code == 0 and tokens == python, err


def test_no_leak_over_expert_switches_under_leak_sanitizer(int8_bundle):
    """The C API's switch loop built with AddressSanitizer: 100 evict-and-reload switches (1,000 take minutes under
    ASan; the release build's 1,000 above bound the growth), then LeakSanitizer's check at exit."""
    proc = subprocess.run(["make", "-s", "native-asan"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    probe = Session(int8_bundle)
    budget = (probe.base_bytes + 1.5 * probe.expert_bytes("code")) / MB
    env = {**os.environ, "MODE_EDGE_ORT_LIB": str(ORT_LIB), "ASAN_OPTIONS": "detect_leaks=1:exitcode=23"}
    proc = subprocess.run([str(ROOT / "build" / "native-asan" / "switch_loop"), str(int8_bundle), str(budget), "100",
                           "code", "prose"], capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0 and "Sanitizer" not in proc.stderr, proc.stderr[-4000:]
    assert json.loads(proc.stdout)["loads"] == 100


def test_refusals_are_one_line_with_exit_2(native, bundle, tmp_path):
    def refused(*args, ids=(1, 2, 3), where=bundle, ort_lib=ORT_LIB):
        code, tokens, err, _ = run_native(native, where, ids and list(ids), *args, ort_lib=ort_lib)
        assert code == 2 and not tokens, err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
        return err

    assert "not installed" in refused("--experts", "law") and "install its pack" in refused("--experts", "law")
    assert "not a plain name" in refused("--experts", "../code")
    assert "--max-new-tokens must be an integer >= 1" in refused("--max-new-tokens", "0")
    assert "outside the vocabulary" in refused(ids=(1, 99999))
    assert "--router must be one of" in refused("--router", "best")
    assert "does not exist" in refused(where=tmp_path / "nothing")
    assert "cannot load onnxruntime from" in refused(ort_lib=tmp_path / "libonnxruntime.so")
    assert "--top-p must be a number > 0" in refused("--top-p", "0")
    assert "is a folder" in refused("--ids-file", str(tmp_path), ids=None)
    assert "give the prompt's token ids once" in refused("--ids-file", str(tmp_path))  # and --ids
    assert "unknown option --profile" in refused("--profile")  # not "needs a value": it is not an option here
    assert "mode-edge tokenize" in refused("--prompt", "hi")
    assert "not onnxruntime" in refused(ort_lib=native)  # an ELF file, but no OrtGetApiBase: refused before loading
    assert "exceed the memory budget" in refused("--experts", "code,prose", "--budget-mb", str(
        (Session(bundle).base_bytes + Session(bundle).expert_bytes("code")) / MB))  # fmt: skip
    manifest = json.loads((bundle / "manifest.json").read_text())
    # a pack for another base, consistently recorded (its pack.json's sha256 updated in the manifest)
    pack_json = bundle / manifest["experts"]["prose"]["pack"]
    pack = json.loads(pack_json.read_text())
    pack_json.write_text(json.dumps({**pack, "base_fingerprint": "f" * 64}))
    import hashlib

    manifest["experts"]["prose"]["pack_sha256"] = hashlib.sha256(pack_json.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert "made for base fingerprint ffffffffffffffff" in refused("--experts", "prose")
    # the other expert still runs, and routing leaves the refused one out with a warning
    code, tokens, err, _ = run_native(native, bundle, [1, 2, 3], "--max-new-tokens", "2")
    assert code == 0 and len(tokens) == 2 and "warning: expert 'prose'" in err and "left out" in err
    # a bundle of another format version, fields of the wrong type, graph inputs in another order
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert "has format version 1" in refused() and "export the bundle again" in refused()
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "format_version": "2"}))
    assert 'format version "2"' in refused()
    broken = json.loads(json.dumps(manifest))
    broken["base"]["decoder"]["dim"] = 64.5
    (bundle / "manifest.json").write_text(json.dumps(broken))
    assert "'dim' must be an integer" in refused()
    broken = json.loads(json.dumps(manifest))
    names = broken["components"]["base/block0"]["inputs"]["onnx"]
    names[3], names[4] = names[4], names[3]  # cos_cache and sin_cache swapped: the graph would compute garbage
    (bundle / "manifest.json").write_text(json.dumps(broken))
    assert "does not name the graph interface" in refused()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    # a damaged base file: the same size, one byte changed
    data = next(bundle / rel for rel in manifest["files"] if rel.endswith(".onnx.data") or rel.endswith(".onnx"))
    flip(data)
    err = refused("--experts", "none")
    assert "does not match its sha256 (corrupted)" in err and "export the bundle again" in err


def test_text_in_and_out_through_mode_edge_tokenize(native, int8_bundle):
    """The user's path: `mode-edge tokenize` encodes the prompt, the native runtime generates ids, `tokenize
    --decode` turns them into the text `mode-edge run` prints for the same prompt."""
    from tests.cli_runner import invoke, refused

    prompt = "def add(a, b):"
    ids = invoke("tokenize", "--bundle", str(int8_bundle), "--prompt", prompt).output.strip()
    code, tokens, err, _ = run_native(native, int8_bundle, [int(i) for i in ids.split(",")], "--experts", "code",
                                      "--max-new-tokens", "16")  # fmt: skip
    assert code == 0, err
    text = invoke("tokenize", "--bundle", str(int8_bundle), "--decode", " ".join(map(str, tokens))).output
    python = invoke("run", "--bundle", str(int8_bundle), "--experts", "code", "--prompt", prompt,
                    "--max-new-tokens", "16").output  # fmt: skip
    assert len(tokens) == 16 and text.rstrip("\n") and python.startswith(text.rstrip("\n"))
    refused("tokenize", "--bundle", str(int8_bundle), message="exactly one of --prompt")
    refused("tokenize", "--bundle", str(int8_bundle), "--decode", "1,x", message="--decode takes token ids")
