"""`mode-edge bench` reports true figures: each configuration's peak RSS is its own, whatever ran before it.

Measured on the tiny int8 bundle: fresh processes running the same configuration agree on the peak within 0.1 MB;
one process running configurations one after another carried 7-16 MB over into the later ones (the base alone:
88.6 MB first, 105.0 MB third), against ~3 MB that an expert of this bundle really adds. A tolerance of 2.5 MB is
25x the noise and well below what a carried-over run adds, so the check fails when runs share a process."""

import json

from tests.test_cli import cli

TOLERANCE_MB = 2.5


def peaks(path):
    runs = json.loads(path.read_text())["runs"]
    return {",".join(r["selection"]) or "none": r["memory"]["peak_rss_mb"] for r in runs}


def test_a_configuration_peak_does_not_depend_on_what_ran_before(int8_bundle, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cli("bench", "--bundle", int8_bundle, "--experts", "code,prose", "--new-tokens", "4", "--json", a)
    cli("bench", "--bundle", int8_bundle, "--experts", "prose,code", "--new-tokens", "4", "--json", b)
    first, second = peaks(a), peaks(b)
    for config in ("code", "prose"):  # second in one order, third in the other
        assert abs(first[config] - second[config]) < TOLERANCE_MB, (config, first, second)
    # an expert adds a little on top of the bare base; it never looks like a whole earlier run
    for result in (first, second):
        assert 0 <= result["code"] - result["none"] < TOLERANCE_MB + 3, result


def test_bench_peak_equals_the_same_run_alone(int8_bundle, tmp_path):
    out, alone = tmp_path / "bench.json", tmp_path / "run.json"
    cli("bench", "--bundle", int8_bundle, "--experts", "prose", "--new-tokens", "4", "--json", out)
    cli("run", "--bundle", int8_bundle, "--experts", "prose", "--prompt", "def fibonacci(n):\n    ",
        "--max-new-tokens", "4", "--json", alone)  # fmt: skip
    run = json.loads(alone.read_text())
    bench = json.loads(out.read_text())
    assert abs(peaks(out)["prose"] - run["memory"]["peak_rss_mb"]) < TOLERANCE_MB
    added = {r["selection"][0]: r["memory"]["added_by"] for r in bench["runs"] if r["selection"]}["prose"]
    assert abs(added["expert prose"]["rss_added_mb"] - run["memory"]["added_by"]["expert prose"]["rss_added_mb"]) < 1
    assert bench["isolation"] == "one fresh process per configuration"
