"""A GGUF file's quantized tensors re-encoded in another llama.cpp type (gguf's own quantize), all
else copied: a real model in a type no file here ships in (SmolLM2 comes as Q4_1 only).

    python -m tests.gguf.requantize SRC DST [--type Q8_0]

Each quantized tensor is expanded to float32 (gguf.quants.dequantize) and quantized again;
float tensors (norms) and the metadata are copied, file_type set to the new type's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

FILE_TYPES = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
_INTERNAL = ("GGUF.", "general.file_type")  # written by the writer, or set below


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: int) -> None:
    for field in reader.fields.values():
        if field.name.startswith(_INTERNAL) or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)


def requantize(src: Path, dst: Path, qtype: str = "Q8_0") -> Path:
    """dst, written once (a finished file is reused: a temporary name, then a rename)."""
    if dst.exists():
        return dst
    kind = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copy_metadata(reader, writer, FILE_TYPES[qtype])
    for t in reader.tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # [.., elements]
        writer.add_tensor(t.name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--type", default="Q8_0", choices=sorted(FILE_TYPES))
    args = p.parse_args()
    print(requantize(args.src, args.dst, args.type))


if __name__ == "__main__":
    main()
