"""onnxruntime session for a wildcheck ONNX file: preprocessed batch in, calibrated probabilities out.

``Predictor`` declares what the checker, evaluation and calibration ask of a model, so a checkpoint
(``training.predict.TorchPredictor``) and an ONNX file are interchangeable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from serving.contract import ContractError, ModelContract, ModelSpec, contract_from_session, open_session
from serving.errors import InvalidInput
from serving.tiling import ViewRule

# The most rows (views) one forward pass takes; bigger batches run in slices of this size. A batch of 32
# pictures is up to 320 views with tiling (a collage's panels); onnxruntime's memory for a pass grows with its
# rows and its arena keeps the largest, while on CPU smaller passes are no slower per view. The robustness
# report of the shipped 1.4.0 on 192 Met photos (2 threads) peaked at 2.15 GB RSS at 16 rows, 1.14 GB at 4,
# 0.86 GB at 1, in 57, 54 and 54 s (benchmarks/pass_rows.py; uncapped it was 9.7 GB with 1.3.1); one thread:
# 19.8 ms per view at 1 row, 22.2 at 4, 25.2 at 16. Read at call time, so a benchmark may set it.
MAX_ROWS_PER_PASS = 4


def in_slices(batch: np.ndarray, run, copies: int = 1) -> list[np.ndarray]:
    """``run(rows) -> [outputs]`` over ``batch`` in slices of at most ``MAX_ROWS_PER_PASS`` rows, each output
    joined back. ``copies``: how many rows the model runs per input row (1 + its test-time views), so a pass
    holds the same number of backbone rows whatever the views."""
    max_rows = max(1, MAX_ROWS_PER_PASS // copies)
    if len(batch) <= max_rows:
        return list(run(batch))
    parts = [run(batch[i : i + max_rows]) for i in range(0, len(batch), max_rows)]
    return [np.concatenate(outs) for outs in zip(*parts)]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@runtime_checkable
class Predictor(Protocol):
    """A model that scores preprocessed float32 NCHW batches as its ``spec`` says (labels, preprocessing,
    temperature, tiling); ``contract``: the release it is or would be exported as (name, version, outputs)."""

    spec: ModelSpec

    @property
    def contract(self) -> ModelContract: ...

    @property
    def has_cam(self) -> bool: ...

    def predict_proba(self, batch: np.ndarray) -> np.ndarray: ...

    def predict_with_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class SpecView:
    """The spec's fields that callers read off a predictor, in one place for both predictors."""

    spec: ModelSpec

    @property
    def labels(self) -> list[str]:
        return self.spec.labels

    @property
    def preprocessing(self):
        return self.spec.preprocessing

    @property
    def temperature(self) -> float:
        return self.spec.temperature

    @property
    def tiling(self):
        return self.spec.tiling

    @property
    def negative_index(self) -> int | None:
        return self.spec.negative_index

    @property
    def view_rule(self) -> ViewRule:
        """How views combine (``serving.tiling.ViewRule``), worked out once per spec."""
        cached = getattr(self, "_view_rule", None)
        if cached is None or cached[0] is not self.spec:
            cached = self._view_rule = (self.spec, ViewRule.of(self.spec))
        return cached[1]


class NoOutputError(InvalidInput):
    """The file lacks a graph output (cam, embedding) that the asked-for feature needs."""


class OnnxModel(SpecView):
    """Loads the file once (its contract comes from the same session); ``predict_proba`` takes float32 NCHW batches."""

    def __init__(self, path: str | Path, threads: int = 1, release_above_rows: int | None = None):
        """``release_above_rows``: after a pass of more rows than this, onnxruntime's arena hands back the memory
        the pass took (arena shrinkage). A server keeps a warm arena for one-photo passes (without an arena a
        320 px view took 1.9x the time: every tensor was a fresh allocation) and does not keep a batch's peak
        forever (8 views of the shipped model after 1: 271 MB left behind in a kept arena, 14 MB released)."""
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        # onnxruntime ignores cgroup limits and thread environment variables: set threads explicitly. Sequential
        # execution and all graph optimisations were the fastest settings on a 2-core AVX2 machine.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = open_session(self.path, options)
        self.release_above_rows = release_above_rows
        self._release = ort.RunOptions()
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.contract: ModelContract = contract_from_session(self.session, source=str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.logits_output = self.output_names[0]  # the contract: logits come first
        self._check_graph_fits_contract()
        cam = self.contract.cam
        # explain needs both: the contract naming the output and the graph having it
        self.cam_output: str | None = cam.output if cam is not None and cam.output in self.output_names else None

    def _check_graph_fits_contract(self) -> None:
        """A file whose metadata does not describe its graph must not load: with fewer labels than logits the
        scores would be paired with the wrong classes, and a wrong input size, type or batch fails every request."""
        inputs = self.session.get_inputs()
        image = inputs[0]
        channels = image.shape[1] if len(image.shape) == 4 else None
        if len(inputs) != 1 or image.type != "tensor(float)" or len(image.shape) != 4 \
                or (isinstance(channels, int) and channels != 3):
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise ContractError(f"{self.path}: the graph takes {found}; a wildcheck model takes one float32 "
                                "batch x 3 x size x size input. Export it with `wildcheck export`")
        if isinstance(image.shape[0], int):  # wildcheck export leaves the batch dynamic; batches of other sizes failed
            raise ContractError(f"{self.path}: the graph's batch size is fixed at {image.shape[0]}; a wildcheck model "
                                "takes any batch. Export it with `wildcheck export`")
        n_logits = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_logits, int) and n_logits != len(self.contract.labels):
            raise ContractError(f"{self.path}: the graph gives {n_logits} logits but the contract names "
                                f"{len(self.contract.labels)} labels {self.contract.labels}; export the run again")
        self._check_named_outputs()
        size = self.contract.preprocessing.input_size
        sides = self.session.get_inputs()[0].shape[2:]
        if any(isinstance(side, int) and side != size for side in sides):
            raise ContractError(f"{self.path}: the graph takes {sides} px inputs but the contract's preprocessing "
                                f"gives {size} px; export the run again")
        # one pass on a mid-grey picture: broken weights (NaN from a diverged training) refuse to load, not
        # answer every request with scores no threshold reaches
        try:
            probe = self.predict_logits(np.zeros((1, 3, size, size), np.float32))
        except Exception as exc:  # onnxruntime's InvalidArgument, Fail, ... from a graph that cannot run
            raise ContractError(f"{self.path}: the model does not run on a {size} px picture "
                                f"({str(exc).splitlines()[0]}); export the run again") from exc
        if probe.shape != (1, len(self.contract.labels)):
            raise ContractError(f"{self.path}: the graph gives logits of shape {list(probe.shape[1:])} per picture but "
                                f"the contract names {len(self.contract.labels)} labels {self.contract.labels}; "
                                "export the run again")
        if not np.isfinite(probe).all():
            raise ContractError(f"{self.path}: the model's scores are not finite (NaN or inf) on a plain picture; "
                                "its weights are broken (a diverged training?). Export a model from a healthy run")

    def _check_named_outputs(self) -> None:
        """The contract's cam and embedding outputs, where the graph has them, are what it says: a ``cam`` naming
        the logits made explain fail with a traceback (a 500 for ``explain=true``)."""
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        cam, emb = self.contract.cam, self.contract.embedding
        wanted = {}
        if cam is not None and cam.output in shapes:
            wanted[cam.output] = ("cam", [None, len(self.contract.labels), None, None])
        if emb is not None and emb.output in shapes:
            wanted[emb.output] = ("embedding", [None, emb.size])
        for name, (what, dims) in wanted.items():
            shape = shapes[name]
            fits = len(shape) == len(dims) and all(not isinstance(have, int) or want is None or have == want
                                                   for have, want in zip(shape, dims))
            if name == self.logits_output or not fits:
                raise ContractError(f"{self.path}: the contract's {what} output {name!r} is not one (the graph gives "
                                    f"{shape}{', the logits' if name == self.logits_output else ''}); export the run again")

    @property
    def spec(self) -> ModelSpec:
        return self.contract

    @property
    def has_cam(self) -> bool:
        return self.cam_output is not None

    def _feed(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def run(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The named outputs only (onnxruntime skips work that feeds none of them), in passes of at most
        ``MAX_ROWS_PER_PASS`` rows."""
        return in_slices(batch, lambda rows: self.session.run(outputs, self._feed(rows), self._run_options(len(rows))),
                         copies=1 + len(self.contract.test_time_views))

    def _run_options(self, rows: int):
        return self._release if self.release_above_rows is not None and rows > self.release_above_rows else None

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        # fetch by name: outputs added to the graph (cam, embedding) are not asked for in a plain check
        return self.run(batch, [self.logits_output])[0]

    def predict_with_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), class activation maps (N, C, h, w)); raises if the file has no ``cam`` output."""
        if self.cam_output is None:
            raise NoOutputError(f"{self.path.name} has no class activation map output; re-export it with this version "
                             "of `wildcheck export` to explain predictions")
        logits, cam = self.run(batch, [self.logits_output, self.cam_output])
        return logits, cam

    @property
    def embedding_output(self) -> str | None:
        spec = self.contract.embedding
        return spec.output if spec is not None and spec.output in self.output_names else None

    def predict_with_embedding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and L2-normalised embeddings in one pass."""
        if self.embedding_output is None:
            raise NoOutputError(f"{self.path} has no embedding output; re-export it with this wildcheck version")
        logits, emb = self.run(batch, [self.logits_output, self.embedding_output])
        return softmax(logits, self.temperature), emb

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_with_embedding(batch)[1]

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.predict_logits(batch), self.temperature)
