"""The precisions a model can be imported at: a name shared by the importer and the command line,
kept apart from the graph builder so that naming one does not load onnx (llmosctl's --help)."""

from typing import Literal

Precision = Literal["int4", "int8", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("int4", "int8", "fp32")
