"""Sec. 5, eq. 11, Table 1: supervised directions are entangled with correlated attributes; removing
their projection onto the other directions leaves mostly the intended change."""

from __future__ import annotations

from .runner import TABLE_ATTRIBUTES, Run, change, holds, verdict

NAME = "table1"
OFF_DIAGONAL_FALL = 0.5  # the mean |off-diagonal| must fall by at least this share


def measure(run: Run) -> dict:
    c = run.config
    test = run.test_samples(c.table_n, NAME)
    before = run.classify(test.images)
    result = {}
    for label in ("supervised", "disentangled"):
        directions = run.supervised(label == "disentangled")
        scores, _ = run.edit_scores(test, [directions[a] for a in TABLE_ATTRIBUTES], [c.table_scale])
        matrix = []
        for d in range(len(TABLE_ATTRIBUTES)):
            after = {k: v[d, 0] for k, v in scores.items()}
            matrix.append([float(change(before, after, b).mean()) for b in TABLE_ATTRIBUTES])
        off = [abs(matrix[i][j]) for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
        result[label] = {
            "matrix": matrix,
            "own_is_strongest": [max(range(len(row)), key=lambda j: abs(row[j])) == i for i, row in enumerate(matrix)],
            "mean_off_diagonal": sum(off) / len(off),
        }
    before_off, after_off = result["supervised"]["mean_off_diagonal"], result["disentangled"]["mean_off_diagonal"]
    ok = all(result["disentangled"]["own_is_strongest"]) and after_off <= (1 - OFF_DIAGONAL_FALL) * before_off
    result["verdict"] = verdict(ok, off_diagonal_fall=OFF_DIAGONAL_FALL)
    return result


def render(res: dict, config) -> list[str]:
    fall_target = res["verdict"]["thresholds"]["off_diagonal_fall"]
    lines = [
        "## Effect matrix and disentanglement (Sec. 5, eq. 11, Table 1)",
        "",
        "Claim: supervised directions (eq. 10) are entangled with correlated attributes; removing their projection onto "
        "the other directions (eq. 11) leaves mostly the intended change.",
        "",
        f"Rows: directions (top {config.table_k} minus bottom {config.table_k} of the bank by the classifier), applied at "
        f"scale {config.table_scale:g} to {config.table_n} held-out samples. Columns: mean change of each attribute. "
        "The strongest effect per row is in bold. Target: after disentanglement every row's strongest effect is its own "
        f"attribute, and the mean |off-diagonal| falls by >= {100 * fall_target:.0f}%.",
        "",
    ]
    for label in ("supervised", "disentangled"):
        lines += [f"{label}:", "", "| direction | " + " | ".join(TABLE_ATTRIBUTES) + " |", "|---" * (len(TABLE_ATTRIBUTES) + 1) + "|"]
        for i, row in enumerate(res[label]["matrix"]):
            best = max(range(len(row)), key=lambda j: abs(row[j]))
            cells = [f"**{v:+.2f}**" if j == best else f"{v:+.2f}" for j, v in enumerate(row)]
            lines.append(f"| {TABLE_ATTRIBUTES[i]} | " + " | ".join(cells) + " |")
        lines += ["", f"mean |off-diagonal| {res[label]['mean_off_diagonal']:.3f}", ""]
    before, after = res["supervised"]["mean_off_diagonal"], res["disentangled"]["mean_off_diagonal"]
    fall = 1 - after / before if before else 0.0
    n = len(TABLE_ATTRIBUTES)
    lines += [f"Result: own attribute strongest in {sum(res['disentangled']['own_is_strongest'])}/{n} rows after "
              f"disentanglement ({sum(res['supervised']['own_is_strongest'])}/{n} before); off-diagonal fell by "
              f"{100 * fall:.0f}%: {holds(res)}.", ""]
    return lines
