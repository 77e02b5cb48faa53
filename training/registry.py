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
from training.names import folder_name, release_names


class PromoteRefused(WildcheckError, RuntimeError):
    """The comparison gate failed (or was not run); nothing was promoted."""

    exit_code = 1


class NoCurrentModel(MissingInput):
    """The registry has no (single) promoted model to serve."""


def _link_text(link: Path) -> str:
    """``current -> TARGET`` for a message (the link's own text, not where it resolves)."""
    try:
        return f"{link} -> {os.readlink(link)}"
    except OSError:
        return str(link)


def _resolved_current(link: Path) -> Path | None:
    """The folder ``current`` points at; None when the link dangles or loops."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target; RuntimeError: a symlink loop (Python < 3.13)
        return None
    return target if target.is_dir() else None


def current_model(registry: str | Path, name: str | None = None) -> Path:
    """The ONNX file ``current`` points at (the only model name in the registry, unless ``name`` is given),
    resolved. ``current`` must name a version folder of ``REGISTRY/<name>/`` whose model is that name and
    version: a link to anywhere else, or a model that is not the one its folders name, is refused."""
    registry = Path(registry)
    if not registry.exists():
        raise NoCurrentModel(f"--registry {registry} does not exist; give the folder `wildcheck promote --registry` "
                             "wrote")
    if not registry.is_dir():
        raise NoCurrentModel(f"--registry {registry} is a file, not a registry folder; give the folder "
                             "`wildcheck promote --registry` wrote (serve an ONNX file as `wildcheck serve FILE`)")
    if name is not None:
        folder_name(name, "--name")
    if name is None:
        names = sorted(p.name for p in registry.iterdir()
                       if p.is_dir() and ((p / "current").is_symlink() or (p / "current").exists()))
        if len(names) != 1:
            raise NoCurrentModel(f"{registry}: expected one promoted model, found {names or 'none'}"
                                 + ("; pass --name" if names else "; promote one with `wildcheck promote`"))
        name = names[0]
    model_dir = registry / name
    link = model_dir / "current"
    if not model_dir.is_dir():
        found = sorted(p.name for p in registry.iterdir() if p.is_dir())
        raise NoCurrentModel(f"{registry} has no model named {name!r} (it has {found or 'none'})")
    if not (link.is_symlink() or link.exists()):
        raise NoCurrentModel(f"{model_dir} has no current model; promote one with `wildcheck promote`")
    if not link.is_symlink() and not link.is_dir():
        raise NoCurrentModel(f"{link} is a file, not the link `wildcheck promote` keeps; point it at a version "
                             "folder beside it (ln -sfn VERSION current) or promote again")
    target = _resolved_current(link)
    if target is None:
        raise NoCurrentModel(f"{_link_text(link)}, which does not exist (a dangling link or a link loop); point it "
                             "at a version folder beside it (ln -sfn VERSION current) or promote again")
    if target.parent != model_dir.resolve():
        raise NoCurrentModel(f"{_link_text(link)} resolves to {target}, outside {model_dir}: the registry serves "
                             "only its own version folders; point it at one (ln -sfn VERSION current)")
    model = target / "model.onnx"
    if not model.is_file():
        raise NoCurrentModel(f"{_link_text(link)}: {target} has no model.onnx file (an interrupted promote?); point "
                             "`current` at a complete version or promote again")
    contract = read_contract(model)
    # a real folder named current (a copy made with `cp -L`) names no version; its model must still be this name's
    version = target.name if link.is_symlink() else contract.model_version
    if (contract.model_name, contract.model_version) != (name, version):
        raise NoCurrentModel(f"{model} is {contract.model_name} {contract.model_version}, but the registry folders "
                             f"say {name} {version}: a file copied in by hand? Promote the run with `wildcheck promote`")
    return model


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
                  + (f" ({'; '.join(compare['failures'])})" if compare.get("failures") else ""),
                  f"measured on split {compare.get('split')!r} of {', '.join(compare.get('data') or ['?'])}"
                  + ("" if compare.get("held_out") else " (not held out from the challenger: promoted with --force)")]
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


def _check_held_out(comparison: dict, compare_path: Path, compare_again: str) -> None:
    """A gate measured on images the challenger trained on (train) or chose its epoch and thresholds by (val)
    flatters it: a weaker model passes. A comparison that does not say (an older wildcheck) counts as not held out."""
    if comparison.get("held_out") is True:
        return
    split = comparison.get("split")
    why = comparison.get("held_out_note") or ("it does not record whether its images were held out from the run "
                                              "(written by an older wildcheck)")
    raise PromoteRefused(f"{compare_path} measured the gate on split {split!r}, which is not a fair test: {why}. "
                         f"Compare on the held-out split (--split test): {compare_again}; or promote with --force")


def _gate(model_dir: Path, comparison: dict | None, compare_path: Path, version: str, run_dir: Path,
          force: bool) -> None:
    """The refusals that do not need the exported file: run before the export (seconds instead of after ~30 s of
    it) and again right before ``current`` moves (the registry may have changed meanwhile)."""
    if model_dir.exists() and not model_dir.is_dir():
        raise InvalidInput(f"{model_dir} is a file, not the model's registry folder; move it away")
    link = model_dir / "current"
    if link.exists() and not link.is_symlink():
        raise InvalidInput(f"{link} is a {'folder' if link.is_dir() else 'file'}, not the link promote keeps (a "
                           "copy made with `cp -L`?); move it away, or promote into the original registry")
    current = None
    if link.is_symlink():  # a link that dangles or loops is a current model too, a broken one: never skip the gate
        target = _resolved_current(link)
        if target is None or not (target / "model.onnx").is_file():
            if not force:
                where = "does not exist (a dangling link or a link loop)" if target is None else "has no model.onnx"
                raise PromoteRefused(f"a current model exists but is broken: {_link_text(link)}, which {where}; "
                                     "restore it and compare with it, or promote with --force to replace it")
        else:
            current = target / "model.onnx"
    if comparison and comparison["gate"] == "fail" and not force:
        raise PromoteRefused(f"the comparison gate failed ({'; '.join(comparison['failures'])}); "
                             "fix the model or promote with --force")
    from training.compare import compare_command  # the training stack: current_model() works without it

    command = compare_command(model_dir / "current" / "model.onnx", run_dir, (comparison or {}).get("data") or [])
    compare_again = f"run `{command}` first"
    if comparison is None and current is not None and not force:
        raise PromoteRefused(f"no comparison with the current model: {compare_again}")
    if comparison is not None and not force:
        _check_compared(comparison, compare_path, version,
                        read_contract(current).model_version if current is not None else None, compare_again)
        _check_held_out(comparison, compare_path, compare_again)


def promote(run: str | Path, registry: str | Path, force: bool = False, name: str | None = None,
            version: str | None = None) -> dict:
    release_names(name, version)
    registry = Path(registry)
    if registry.exists() and not registry.is_dir():
        raise InvalidInput(f"--registry {registry} is a file; give a folder (created on the first promote)")
    from training.checkpoint import Checkpoint  # the training stack: current_model() works without it
    from training.export import export
    from training.outputs import out_folder
    from training.predict import resolve_checkpoint

    ckpt = resolve_checkpoint(run)
    run_dir = ckpt.parent
    compare_path = run_dir / "compare.json"
    try:
        comparison = json.loads(compare_path.read_text()) if compare_path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{compare_path} is not readable JSON ({exc}); run `wildcheck compare` again") from exc
    if comparison is not None and not isinstance(comparison, dict):
        raise InvalidInput(f"{compare_path} is not a comparison `wildcheck compare` wrote; run it again")
    # the name and version the export will give (the checkpoint's, without exporting): every refusal that does not
    # need the file comes before the ~30 s export
    checkpoint = Checkpoint.load(ckpt)
    # never inside a data folder the run or its comparison read: the next training or comparison would read it
    out_folder(registry, reads=[*checkpoint.data_roots, *checkpoint.config.data.negatives,
                                *((comparison or {}).get("data") or [])], option="--registry", what="registry folder")
    planned = checkpoint.release(name, version, ckpt.parent.name)
    _gate(registry / folder_name(planned.model_name, "--name"), comparison, compare_path,
          folder_name(planned.model_version, "--version"), run_dir, force)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        export(ckpt, staged, name=name, version=version)
        contract = read_contract(staged)
        model_dir = registry / folder_name(contract.model_name, "--name")
        folder_name(contract.model_version, "--version")
        _gate(model_dir, comparison, compare_path, contract.model_version, run_dir, force)
        target = model_dir / contract.model_version
        target.mkdir(parents=True, exist_ok=True)
        with atomic_path(target / "model.onnx") as final:
            shutil.copyfile(staged, final)
    run_path = run_dir.resolve()  # the record outlives the shell it was typed in: no relative path
    atomic_write_text(target / "model_card.md", _card(contract, comparison, run_path))
    atomic_write_text(target / "metrics.json", json.dumps({"contract_metrics": contract.metrics,
                                                           "comparison": comparison}, indent=2))
    previous = os.readlink(model_dir / "current") if (model_dir / "current").is_symlink() else None
    _point_current(model_dir, contract.model_version)
    event = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": contract.model_version,
             "previous": previous, "run": str(run_path), "forced": bool(force),
             "gate": comparison["gate"] if comparison else None,
             # what the gate was measured on: a --force over a comparison on train or val stays visible
             "split": comparison.get("split") if comparison else None,
             "data": comparison.get("data") if comparison else None,
             "held_out": comparison.get("held_out") if comparison else None}
    with (model_dir / "promotions.jsonl").open("a") as fh:
        fh.write(json.dumps(event) + "\n")
    return {"name": contract.model_name, "version": contract.model_version, "path": str(target / "model.onnx"),
            "previous": previous}
