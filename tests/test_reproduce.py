"""`hspace reproduce --quick`: the report is produced, every section is there, and its numbers are sane."""

import json
import re

from hspace.cli import main
from hspace.reproduce import SECTIONS, TABLE_ATTRIBUTES


def test_quick_reproduce_writes_a_sane_report_and_resumes(tmp_path):
    out = tmp_path / "r"
    assert main(["reproduce", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for title in ("PCA vs random", "Table 1", "Fig. 8", "Fig. 7", "Fig. 3", "SM A", "Fig. 11", "Timings"):
        assert title in report, title
    assert len(re.findall(r"\*\*(holds|does not hold)\*\*", report)) == 7
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).stat().st_size > 1000, image

    sections = {name: json.loads((out / "sections" / f"{name}.json").read_text()) for name in SECTIONS}
    share = lambda x: 0.0 <= x <= 1.0  # noqa: E731
    pca = sections["pca_vs_random"]
    assert all(share(v) for v in pca["strongest_binary_change_at_max_scale"].values())
    assert sum(pca["variance_ratio"]) < 1 and sorted(pca["variance_ratio"], reverse=True) == pca["variance_ratio"]
    for label in ("supervised", "disentangled"):
        matrix = sections["table1"][label]["matrix"]
        assert len(matrix) == len(TABLE_ATTRIBUTES) and all(len(r) == len(TABLE_ATTRIBUTES) for r in matrix)
        assert all(-1 <= v <= 1 for r in matrix for v in r)
    assert all(share(r["h_success"]) and share(r["x_T_success"]) for r in sections["fig8"]["rows"])
    assert all(share(r["inside_source"]) and share(r["inside_transfer"]) and r["singular_value"] > 0 for r in sections["jacobian"]["rows"])
    assert all(share(v["follows_h"]) for v in sections["swap"]["attributes"].values())
    assert all(share(v) for r in sections["sequential"]["rows"] for v in r["present"].values())
    timings = json.loads((out / "timings.json").read_text())
    assert set(SECTIONS) <= set(timings) and all(t > 0 for t in timings.values())

    # Run again: every section comes from its cache (same numbers, the bank is not drawn again).
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "sections").iterdir()}
    assert main(["reproduce", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "sections").iterdir()} == stamp
    assert (out / "report.md").read_text().split("## Timings")[0] == report.split("## Timings")[0]
