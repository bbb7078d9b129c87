"""`evo report`: a real small search, then report.html and its PNGs checked as files, as decoded
images, against the run store (best member, exploits) and as a page rendered by headless Chromium."""
from __future__ import annotations

import base64
import copy
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from experiments.config import build_setup, load_config
from population.driver import run_search
from population.report import (PLOTS, fitness_segments, lineage_edges, lineage_nodes, load_run, summary,
                               write_report)
from population.store import RunStore, StoreError
from tests.population import chromium

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "population.size=3", "population.total_steps=40", "population.interval_steps=10",
    "data.seq_len=32", "data.max_bytes=300000", "data.eval_batches=2",
    "model.hidden_size=32", "model.intermediate_size=64",
    "logging.wandb.mode=disabled", "logging.optuna=false",
]

SINGLE = [k for k in PLOTS if k != "mix"]   # the plots of a run with one data source


def _search(storage: Path, overrides: list[str]) -> None:
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", TINY + [f"storage={storage}", *overrides])
    summary_ = run_search(build_setup(cfg), console=Console(file=io.StringIO()))
    assert summary_["status"] == "finished"


@pytest.fixture(scope="module")
def storage(tmp_path_factory, ray_local) -> Path:
    """Two real runs: PBT over 4 rounds (exploits happen), NSGA-II over [val_bpb, params] in one round."""
    root = tmp_path_factory.mktemp("report-runs")
    _search(root, ["name=pbt", "strategy.quantile=0.34"])
    _search(root, ["name=nsga", "strategy.name=nsga2", "strategy.objectives=[val_bpb, params]",
                   "population.total_steps=10"])
    return root


@pytest.fixture(scope="module")
def pbt_report(storage) -> Path:
    return Path(write_report(str(storage), "pbt"))


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def _parse(html_text: str) -> _Images:
    p = _Images()
    p.feed(html_text)
    return p


def _pixels(data: bytes | Path) -> np.ndarray:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return np.asarray(img.convert("RGB"), dtype=np.float64)


def _assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10   # lines, text and fills, not one colour


def _best(state: dict) -> dict:
    alive = [m for m in state["members"] if m["alive"] and m["history"]]
    return min(alive, key=lambda m: (m["history"][-1][1], m["id"]))


def test_report_writes_html_and_every_plot_into_the_run_store(storage, pbt_report):
    assert pbt_report == storage / "pbt" / "report" / "report.html"
    for key in SINGLE:   # a single-objective run still plots val_bpb against params
        png = pbt_report.parent / f"{key}.png"
        assert png.is_file(), key
        _assert_not_blank(_pixels(png))


def test_html_is_self_contained_with_one_data_uri_image_per_plot(pbt_report):
    text = pbt_report.read_text()
    page = _parse(text)
    assert [img["data-plot"] for img in page.imgs] == list(SINGLE)
    for img in page.imgs:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix):]) == (pbt_report.parent / f"{img['data-plot']}.png").read_bytes()
        assert len(img["alt"]) > 20
    assert all(url.startswith("data:") for url in page.urls)   # nothing external is linked
    assert not re.search(r"https?://", text)
    assert text.count("<h2") >= len(SINGLE)


def test_summary_names_the_best_member_and_counts_exploits(storage, pbt_report):
    state = RunStore(storage, "pbt").read_state()
    best = _best(state)
    text = pbt_report.read_text()
    assert f"m{best['id']} at step {best['step']}" in text
    assert f"{best['history'][-1][1]:.4f}" in text
    s = summary(load_run(str(storage), "pbt"))
    assert s["best"]["member"] == best["id"] and s["best"]["val_bpb"] == best["history"][-1][1]
    assert s["status"] == "finished" and s["round"] == 4 and s["total_rounds"] == 4
    assert s["exploits"] == len(state["exploit_latencies"]) > 0
    assert 0 < s["efficiency"] <= 1.5
    for m in state["members"]:
        assert f"<td>m{m['id']}</td>" in text


def test_fitness_plot_jumps_from_the_abandoned_point_to_the_donors_point(storage):
    run = load_run(str(storage), "pbt")
    jumps = [r for r in run.lineage if r["event"] in ("exploit", "crossover") and r["parents"]]
    assert jumps, "PBT with 3 members over 4 rounds exploits"
    drawn = 0
    for m in run.members:
        segments, connectors = fitness_segments(m, run.lineage)
        mine = [r for r in jumps if r["member"] == m["id"]]
        assert len(connectors) == len(mine)
        assert len(segments) == len(mine) + 1
        for ((x0, y0), (x1, y1), event), rec in zip(connectors, mine):
            assert event == rec["event"]
            assert (x0, y0) == (rec["step"], rec["fitness"])              # the member's own last point
            assert (x1, y1) == (rec["step"], rec["parent_fitness"][0])    # the donor's point
        points = [p for seg in segments for p in seg]
        assert set(map(tuple, m["history"])) <= set(points)
        drawn += len(connectors)
    assert drawn == len(jumps)


def test_lineage_tree_has_a_node_per_round_and_member_and_an_edge_per_jump(storage):
    run = load_run(str(storage), "pbt")
    rounds = run.state["round"]
    nodes = lineage_nodes(run)
    assert set(nodes) == {(r, m["id"]) for r in range(rounds + 1) for m in run.members}
    for m in run.members:
        assert [nodes[(r, m["id"])] for r in range(1, rounds + 1)] == [v for _, v in m["history"]]
        assert nodes[(0, m["id"])] is None
    edges = lineage_edges(run)   # a jump after round r feeds the member's node at round r + 1
    jumps = [r for r in run.lineage if r["event"] in ("exploit", "crossover", "restart") and r["parents"]]
    assert edges == {(r["round"] + 1, r["member"]): [(r["parents"][0], r["event"])] for r in jumps}


def test_multi_objective_one_round_run_has_a_pareto_plot(storage):
    report = Path(write_report(str(storage), "nsga"))
    state = RunStore(storage, "nsga").read_state()
    assert state["round"] == 1
    _assert_not_blank(_pixels(report.parent / "pareto.png"))
    page = _parse(report.read_text())
    assert [img["data-plot"] for img in page.imgs] == list(SINGLE)
    s = summary(load_run(str(storage), "nsga"))
    assert s["objectives"] == ["val_bpb", "params"] and s["round"] == 1
    assert s["best"]["member"] == _best(state)["id"]


def _copy_run(storage: Path, name: str, dest: Path) -> RunStore:
    shutil.copytree(storage / name, dest / name, ignore=shutil.ignore_patterns("checkpoints", "report"))
    return RunStore(dest, name)


def test_run_in_progress_with_members_not_yet_evaluated(storage, tmp_path):
    store = _copy_run(storage, "pbt", tmp_path)
    state = copy.deepcopy(store.read_state())
    state["status"] = "running"
    fresh = state["members"][0]          # as after a fresh restart: nothing evaluated yet
    fresh.update(history=[], objectives={}, step=0)
    store.commit_state(state)
    report = Path(write_report(str(tmp_path), "pbt"))
    assert "running" in report.read_text()
    for key in SINGLE:
        _assert_not_blank(_pixels(report.parent / f"{key}.png"))
    assert summary(load_run(str(tmp_path), "pbt"))["best"]["member"] != fresh["id"]

    for m in state["members"]:           # round 0 committed: nobody evaluated, no objectives
        m.update(history=[], objectives={}, step=0)
    state["round"] = 0
    store.commit_state(state)
    report = Path(write_report(str(tmp_path), "pbt"))
    plots = [img["data-plot"] for img in _parse(report.read_text()).imgs]
    assert plots == ["fitness", "hyperparameters", "lineage"]
    assert not (report.parent / "pareto.png").exists()   # the earlier report's is removed
    assert "no evaluation yet" in report.read_text()


def test_run_without_a_committed_round(tmp_path, storage):
    store = RunStore(tmp_path, "fresh")
    store.create(RunStore(storage, "pbt").read_config())
    report = Path(write_report(str(tmp_path), "fresh"))
    assert "no round committed yet" in report.read_text()
    assert len(_parse(report.read_text()).imgs) == 3


MARKUP = "<img src=x onerror=alert(1)>"


def test_every_value_shown_is_html_escaped(storage, tmp_path):
    """Markup planted in a genome string value, the run's config, lineage lines (error text, what
    changed, how, member, step) and the population's fields is shown as text, never as a tag."""
    store = _copy_run(storage, "pbt", tmp_path)
    state = copy.deepcopy(store.read_state())
    best = _best(state)
    best["genome"]["train.lr"] = MARKUP               # the best genome is shown twice
    best["schedule"][-1]["genome"]["train.lr"] = MARKUP
    best["schedule"][-1]["seed"] = MARKUP
    other = next(m for m in state["members"] if m["id"] != best["id"])
    other.update(parent=MARKUP, age=MARKUP)
    state["status"] = MARKUP
    store.commit_state(state)
    lineage = store.read_lineage()
    planted = [
        dict(lineage[-1], event="died", error=MARKUP),
        dict(lineage[-1], event="explore", changed=MARKUP, how=MARKUP),
        dict(lineage[-1], event="born", genome={"train.lr": MARKUP}),
        dict(lineage[-1], event=MARKUP, member=MARKUP, round=MARKUP, step=MARKUP, parents=[MARKUP]),
    ]
    state["lineage_count"] = store.append_lineage(planted)
    store.commit_state(state)
    config = store.read_config()
    config["strategy"]["name"] = MARKUP
    (tmp_path / "pbt" / "config.yaml").write_text(__import__("yaml").safe_dump(config))

    page = Path(write_report(str(tmp_path), "pbt")).read_text()
    assert "<img src=x" not in page
    assert "onerror=alert(1)>" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 9
    assert len(_parse(page).imgs) == len(SINGLE)   # only the plots are images


def test_unknown_run_is_a_one_line_store_error(storage):
    with pytest.raises(StoreError) as e:
        write_report(str(storage), "no-such-run")
    assert "no-such-run" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError):
        write_report(str(storage), "../pbt")
    assert not (storage / "no-such-run").exists()


def test_remote_storage_writes_locally_and_uploads_to_the_store(storage, tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    for path in (storage / "pbt").rglob("*"):
        rel = path.relative_to(storage / "pbt")
        if path.is_file() and rel.parts[0] not in ("checkpoints", "report"):
            fs.pipe_file(f"/evo-report-test/pbt/{rel.as_posix()}", path.read_bytes())
    monkeypatch.chdir(tmp_path)
    try:
        report = Path(write_report("memory://evo-report-test", "pbt"))
        assert report == tmp_path / "pbt-report" / "report.html"
        for fname in ["report.html", *(f"{k}.png" for k in SINGLE)]:
            assert fs.cat_file(f"/evo-report-test/pbt/report/{fname}") == (report.parent / fname).read_bytes()
    finally:
        fs.rm("/evo-report-test", recursive=True)


def test_chromium_renders_every_image(pbt_report, tmp_path):
    chromium.ensure_chromium()
    shot = chromium.screenshot(pbt_report, tmp_path / "report.png")
    _assert_not_blank(_pixels(shot))

    dom = chromium.dump_dom(pbt_report)
    imgs = _parse(dom).imgs
    assert [img["data-plot"] for img in imgs] == list(SINGLE)
    for img in imgs:
        assert img.get("data-ok") == "1", img["data-plot"]
        assert int(img["data-natural-width"]) > 100

    # the check can fail: an image whose data does not decode is marked data-ok="0"
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'(data:image/png;base64,)[^"]{200}', r"\1AAAA", pbt_report.read_text(), count=1))
    marks = {img["data-plot"]: img.get("data-ok") for img in _parse(chromium.dump_dom(broken)).imgs}
    assert marks == {"fitness": "0", "hyperparameters": "1", "lineage": "1", "pareto": "1"}
