"""benchmarks/make_results.py: the page is built from the result files only, every number on it is
in the file its row names, and the same files give the same page."""

import json
import math
import os
import re
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import make_results  # noqa: E402

LINK = re.compile(r"\[`[^`]+`\]\(([^)]+\.json)\)")


def leaves(x):
    """Every number in a JSON value (bools excluded)."""
    if isinstance(x, dict):
        return [v for y in x.values() for v in leaves(y)]
    if isinstance(x, list):
        return [v for y in x for v in leaves(y)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def unsourced_cells(page: str, out_dir: str) -> tuple[list[str], int]:
    """(cells of a file's row that are a number not in that file, number of cells checked)."""
    bad, checked = [], 0
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = LINK.fullmatch(cells[0]) if line.startswith("|") else None
        if not m:
            continue
        with open(os.path.join(out_dir, m.group(1))) as f:
            values = leaves(json.load(f))
        for cell in cells[1:]:
            try:
                x = float(cell)
            except ValueError:
                continue
            checked += 1
            if not any(math.isclose(x, v, rel_tol=0, abs_tol=5e-5) for v in values):  # the page rounds to 4 dp
                bad.append(f"{m.group(1)}: {cell}")
    return bad, checked


@pytest.fixture
def results_copy(tmp_path):
    """The committed result files in a scratch directory the test may change; the page goes beside it."""
    shutil.copytree(RESULTS, tmp_path / "results")
    return str(tmp_path / "results"), str(tmp_path)


def test_every_number_on_the_page_is_in_its_file(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert make_results.main(["--out", str(out)]) == 0
    page = out.read_text()
    bad, checked = unsourced_cells(page, str(tmp_path))
    assert not bad
    assert checked >= 50  # the tables were parsed, not skipped
    # every committed file is listed under Sources, none dropped
    sources = page.split("## Sources")[1]
    for path, _, _ in make_results.load(RESULTS):
        assert os.path.relpath(path, tmp_path) in sources


def test_a_row_holds_its_files_numbers():
    page = make_results.render(RESULTS, RESULTS)
    with open(os.path.join(RESULTS, "rollout.json")) as f:
        r = json.load(f)
    row = next(line for line in page.splitlines() if "rollout.json" in line and "| prefix_cache |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    p = r["prefix_cache"]
    assert cells[4:10] == [str(p["seconds"]), str(p["episode_tokens_per_s"]), str(p["prompt_tokens"]),
                           str(p["prefill_tokens"]), str(p["prefix_hits"]), str(r["speedup_vs_reprefill"])]


def test_checker_catches_a_number_not_in_the_file(results_copy):
    results, out_dir = results_copy
    page = make_results.render(results, out_dir)
    path = os.path.join(results, "forward.json")
    with open(path) as f:
        data = json.load(f)
    old = data["speedup_vs_hf"]
    data["speedup_vs_hf"] = old + 1.0
    with open(path, "w") as f:
        json.dump(data, f)
    bad, _ = unsourced_cells(page, out_dir)
    assert bad == [f"results/forward.json: {old}"]


def test_same_files_same_page(results_copy):
    results, out_dir = results_copy
    first = make_results.render(results, out_dir)
    # file order on disk must not matter: recreate the files in reverse order
    for name in sorted(os.listdir(results), reverse=True):
        if name.endswith(".json"):
            src = os.path.join(results, name)
            with open(src) as f:
                data = f.read()
            os.remove(src)
            with open(src, "w") as f:
                f.write(data)
    assert make_results.render(results, out_dir) == first


def test_not_measured_follows_the_files(results_copy):
    results, out_dir = results_copy
    full = "MFU of the full 36-layer Qwen3-4B step"
    assert full in make_results.render(results, out_dir).split("## Not measured")[1]
    with open(os.path.join(results, "h100", "session3", "sft_cudnn_16l.json")) as f:
        data = json.load(f)
    data["config"]["num_layers"] = 36
    with open(os.path.join(results, "h100", "zz_36.json"), "w") as f:
        json.dump(data, f)
    page = make_results.render(results, out_dir)
    assert full not in page.split("## Not measured")[1]
    assert "| [`results/h100/zz_36.json`](results/h100/zz_36.json) | sft | 36 |" in page.split("## GPU")[1]


def test_unrecognised_file_is_listed_not_dropped(results_copy):
    results, out_dir = results_copy
    with open(os.path.join(results, "zz_other.json"), "w") as f:
        json.dump({"something": 123.456}, f)
    page = make_results.render(results, out_dir)
    assert "| [`results/zz_other.json`](results/zz_other.json) | not recognised |" in page
    assert "123.456" not in page
