"""Expert storage formats, one file each, all keeping the `ExpertsLike` contract (`base.py`) so dispatch runs
them without asking which it runs:

  dense.py      `Experts`: fused 3D tensors as transformers v5 stores them (and `SharedExperts`).
  ragged.py     `RaggedExperts`: experts of different widths packed end to end (HEAPr's atomic-expert pruning).
  lowrank.py    `LowRankExperts`: every projection as two rank-r factors (MC-SMoE's SVD compression).
  qformat.py    `QuantizedExperts`: int8 / int4 / ternary / bf16 codes with group scales, dequantized per expert;
                torch only, copied verbatim into quantized checkpoints (`moekit_qformat.py`).
  quantized.py  `DispatchedQuantizedExperts`: the quantized format run by moekit's dispatch, with packed int8/int4
                CPU kernels where torch has them (imported on its own: it depends on `moekit.core.dispatch`).

`ragged.py`, `lowrank.py` and `qformat.py` need only torch: `moekit.hf.manifest` copies them (or parts of them)
into checkpoints that plain transformers loads with `trust_remote_code=True`.
"""

from moekit.core.experts.base import ACTIVATIONS, Activation, ExpertsLike, linear
from moekit.core.experts.dense import Experts, SharedExperts
from moekit.core.experts.lowrank import LowRankExperts, make_lowrank
from moekit.core.experts.qformat import QuantizedExperts, QuantizedMatrix
from moekit.core.experts.ragged import RaggedExperts, make_ragged

__all__ = ["ACTIVATIONS", "Activation", "Experts", "ExpertsLike", "LowRankExperts", "QuantizedExperts",
           "QuantizedMatrix", "RaggedExperts", "SharedExperts", "linear", "make_lowrank", "make_ragged"]
