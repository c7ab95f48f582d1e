"""The editor's starter set, as a library function: what ``hspace ui`` shows when no directions are given."""

import hashlib
import json
from pathlib import Path

from ..directions.direction import Direction
from ..errors import HspaceError
from ..files import safe_name


def starter_folder(engine, workdir: str | Path, steps: int, eta: float) -> Path:
    """Where the starter set of this engine and process is kept: one folder per model, steps, eta and engine
    options that change the samples (another ``--autocast`` draws its own set beside; ``--channels-last`` reuses)."""
    key = hashlib.sha256(json.dumps(engine.spec.key(), sort_keys=True).encode()).hexdigest()[:8]
    return Path(workdir) / f"bank-{safe_name(engine.name)}-{steps}-{eta:g}-{key}"


def starter_directions(engine, workdir: str | Path, steps: int, eta: float, n: int = 48, k: int = 6, callback=None) -> list[Direction]:
    """What the editor shows when no directions are given: the top-k PCs of a small bank (drawn once into
    ``starter_folder`` and reused) and, for a model with a domain classifier, one direction per binary attribute:
    h of all n samples regressed on the classifier's scores of every attribute at once (each direction holds the
    others fixed: the least entangled method of docs/reproduce.md), at the norm of the attribute's eq. 10
    direction (top n/6 minus bottom n/6). They are also written to the folder's ``starter/`` (for ``hspace card``).
    ``callback`` gets the bank's ``StepEvent``s."""
    from ..bank import build_bank
    from ..directions.pca import pca
    from ..directions.regression import regression_directions
    from ..directions.supervised import annotate_bank, direction_from_scores
    from ..domains import domain_of

    folder = starter_folder(engine, workdir, steps, eta)
    bank = build_bank(folder, engine, n, steps, eta, shard_size=n, callback=callback, progress=None)
    directions = pca(bank, k).directions
    try:
        domain = domain_of(engine.spec)
    except HspaceError:
        domain = None
    if domain is not None:
        if not bank.scores_path("classifier").is_file():
            annotate_bank(bank, domain.scorer())
        fitted = regression_directions(bank, list(domain.binary)).directions
        for attribute, d in zip(domain.binary, fitted):
            directions.append(d.renamed(attribute, norm_of=direction_from_scores(bank, attribute, max(1, n // 6))))
    (folder / "starter").mkdir(exist_ok=True)
    for d in directions:
        path = folder / "starter" / safe_name(d.name, suffix=".safetensors")
        if not path.is_file():
            d.save(path)
    return directions
