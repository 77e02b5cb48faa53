"""onnxruntime session for a wildcheck ONNX file: preprocessed batch in, calibrated probabilities out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.contract import ModelContract, read_contract


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class OnnxModel:
    """Loads the file once; ``predict_proba`` takes float32 NCHW batches."""

    def __init__(self, path: str | Path, threads: int = 1, memory_arena: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        self.contract: ModelContract = read_contract(self.path)
        options = ort.SessionOptions()
        # NOTES: onnxruntime ignores cgroup limits; set threads explicitly. Sequential + all graph
        # optimisations were the fastest settings on a 2-core AVX2 machine.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # the arena keeps the peak of concurrent runs forever; a long-running server turns it off
        options.enable_cpu_mem_arena = memory_arena
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def labels(self) -> list[str]:
        return self.contract.labels

    @property
    def preprocessing(self):
        return self.contract.preprocessing

    @property
    def temperature(self) -> float:
        return self.contract.temperature

    @property
    def tiling(self):
        return self.contract.tiling

    @property
    def negative_index(self) -> int | None:
        labels = self.contract.labels
        return labels.index(self.contract.negative_label) if self.contract.negative_label in labels else None

    def run(self, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The named outputs only: onnxruntime skips work that feeds none of them."""
        return self.session.run(outputs, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch, ["logits"])[0]

    @property
    def embedding_output(self) -> str | None:
        spec = self.contract.embedding
        return spec.output if spec is not None and spec.output in self.output_names else None

    def predict_with_embedding(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and L2-normalised embeddings in one pass."""
        if self.embedding_output is None:
            raise ValueError(f"{self.path} has no embedding output; re-export it with this wildcheck version")
        logits, emb = self.run(batch, ["logits", self.embedding_output])
        return softmax(logits, self.temperature), emb

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self.predict_with_embedding(batch)[1]

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.predict_logits(batch), self.temperature)
