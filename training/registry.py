"""``wildcheck promote``: a versioned model registry on a filesystem, with an atomic ``current`` pointer.

Layout::

    REGISTRY/<model_name>/<model_version>/model.onnx      # the contract travels inside
    REGISTRY/<model_name>/<model_version>/model_card.md
    REGISTRY/<model_name>/<model_version>/metrics.json
    REGISTRY/<model_name>/current -> <model_version>      # symlink, replaced atomically
    REGISTRY/<model_name>/promotions.jsonl                # who/what/when, append-only

``wildcheck serve --registry REGISTRY`` serves ``current``. BentoML users can instead import the same
file into the BentoML model store (``bentoml.models.create(name)`` and copy ``model.onnx`` in), with the
model version as the tag; the service only needs the ONNX path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from serving.contract import read_contract, weights_id
from serving.errors import InvalidInput, MissingInput, WildcheckError
from training.fileio import atomic_path, atomic_write_text


class PromoteRefused(WildcheckError, RuntimeError):
    """The comparison gate failed (or was not run); nothing was promoted."""

    exit_code = 1


class NoCurrentModel(MissingInput):
    """The registry has no (single) promoted model to serve."""


def current_model(registry: str | Path, name: str | None = None) -> Path:
    """The ONNX file ``current`` points at (the only model name in the registry, unless ``name`` is given)."""
    registry = Path(registry)
    names = sorted(p.name for p in registry.iterdir() if (p / "current").exists()) if registry.is_dir() else []
    if name is None:
        if len(names) != 1:
            raise NoCurrentModel(f"{registry}: expected one promoted model, found {names or 'none'}; pass --name")
        name = names[0]
    path = registry / name / "current" / "model.onnx"
    if not path.exists():
        raise NoCurrentModel(f"{registry}/{name} has no current model; promote one with `wildcheck promote`")
    return path


RESERVED_NAMES = {"current", "promotions.jsonl"}


def _folder_name(value: str, option: str) -> str:
    """A model name or version is one folder of the registry: a path (``../x``, ``/abs``) would write outside
    it, and a reserved or hidden name would collide with the ``current`` link or its temporaries."""
    if (not value or value in {".", ".."} or value in RESERVED_NAMES or value.startswith(".")
            or any(c in value for c in "/\\\0")):
        raise InvalidInput(f"{option} {value!r} cannot name a folder of the registry: use letters, digits and "
                           "-_.+ (not starting with a dot), e.g. 1.7.0; not a path")
    return value


def _point_current(model_dir: Path, version: str) -> None:
    link = model_dir / "current"
    tmp = model_dir / f".current.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(version, tmp)
    os.replace(tmp, link)  # atomic: readers see the old or the new version, never neither


def _card(contract, compare: dict | None, run_dir: Path) -> str:
    val = contract.metrics.get("val", {})
    lines = [f"# {contract.model_name} {contract.model_version}", "",
             f"- architecture: {contract.architecture}", f"- labels: {', '.join(contract.labels)}",
             f"- created: {contract.created_at}; wildcheck {contract.wildcheck_version}",
             f"- training data fingerprint: {contract.training_data.get('sha256', '?')}",
             f"- run: {run_dir}", f"- preprocessing: {contract.preprocessing.model_dump()}",
             f"- temperature: {contract.temperature:.3f}", "", "## Thresholds", ""]
    lines += [f"- {k}: block >= {v.block if v.block is not None else 'never'}, review >= {v.review}"
              for k, v in contract.thresholds.items()]
    if val:
        lines += ["", "## Validation", "", f"accuracy {val.get('accuracy', 0):.4f}, balanced accuracy "
                  f"{val.get('balanced_accuracy', 0):.4f}, macro-F1 {val.get('macro_f1', 0):.4f} on {val.get('n')} images"]
    if compare:
        lines += ["", "## Comparison with the previous champion", "", f"gate: {compare['gate']}"
                  + (f" ({'; '.join(compare['failures'])})" if compare.get("failures") else "")]
    lines += ["", "## Intended use", "", "Flag listing photos that may sell illegal wildlife products for removal or "
              "human review. Scores are calibrated on the validation split; re-check thresholds on the platform's own data."]
    return "\n".join(lines) + "\n"


def _check_compared(comparison: dict, compare_path: Path, challenger_version: str, current_version: str | None,
                    compare_again: str) -> None:
    """A passed gate counts only for these weights against the model now current: a comparison with an older
    champion, with any other model, or of weights trained since, let a weaker model replace the current one."""
    if comparison.get("challenger_weights") != weights_id(challenger_version):
        raise PromoteRefused(f"{compare_path} was written for other weights than the run's ({weights_id(challenger_version)}), "
                             f"or by an older wildcheck; {compare_again}")
    if current_version is not None and comparison.get("champion_weights") != weights_id(current_version):
        raise PromoteRefused(f"{compare_path} compared the run with {comparison.get('champion')} (weights "
                             f"{comparison.get('champion_weights')}), not with the current model {current_version}; "
                             f"{compare_again}")


def promote(run: str | Path, registry: str | Path, force: bool = False, name: str | None = None,
            version: str | None = None) -> dict:
    from training.predict import resolve_checkpoint  # the training stack: current_model() works without it
    from training.export import export

    for value, option in ((name, "--name"), (version, "--version")):
        if value is not None:
            _folder_name(value, option)
    ckpt = resolve_checkpoint(run)
    run_dir = ckpt.parent
    registry = Path(registry)
    compare_path = run_dir / "compare.json"
    try:
        comparison = json.loads(compare_path.read_text()) if compare_path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{compare_path} is not readable JSON ({exc}); run `wildcheck compare` again") from exc
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        export(ckpt, staged, name=name, version=version)
        contract = read_contract(staged)
        model_dir = registry / _folder_name(contract.model_name, "--name")
        _folder_name(contract.model_version, "--version")
        if (model_dir / "current").exists() and not (model_dir / "current").is_symlink():
            raise InvalidInput(f"{model_dir / 'current'} is a folder, not the link promote keeps (a copy made with "
                               "`cp -L`?); move it away, or promote into the original registry")
        has_current = (model_dir / "current").exists()
        if comparison and comparison["gate"] == "fail" and not force:
            raise PromoteRefused(f"the comparison gate failed ({'; '.join(comparison['failures'])}); "
                                 "fix the model or promote with --force")
        compare_again = (f"run `wildcheck compare {model_dir / 'current' / 'model.onnx'} {run_dir} --data ROOT "
                         "--split test` first")
        if comparison is None and has_current and not force:
            raise PromoteRefused(f"no comparison with the current model: {compare_again}")
        if comparison is not None and not force:
            _check_compared(comparison, compare_path, contract.model_version,
                            read_contract(model_dir / "current" / "model.onnx").model_version if has_current else None,
                            compare_again)
        target = model_dir / contract.model_version
        target.mkdir(parents=True, exist_ok=True)
        with atomic_path(target / "model.onnx") as final:
            shutil.copyfile(staged, final)
    atomic_write_text(target / "model_card.md", _card(contract, comparison, run_dir))
    atomic_write_text(target / "metrics.json", json.dumps({"contract_metrics": contract.metrics,
                                                           "comparison": comparison}, indent=2))
    previous = os.readlink(model_dir / "current") if (model_dir / "current").is_symlink() else None
    _point_current(model_dir, contract.model_version)
    event = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": contract.model_version,
             "previous": previous, "run": str(run_dir), "forced": bool(force),
             "gate": comparison["gate"] if comparison else None}
    with (model_dir / "promotions.jsonl").open("a") as fh:
        fh.write(json.dumps(event) + "\n")
    return {"name": contract.model_name, "version": contract.model_version, "path": str(target / "model.onnx"),
            "previous": previous}
