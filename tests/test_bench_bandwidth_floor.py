"""bench.bandwidth_floor: the weight bytes a decode step reads, counted from GGUF files the gguf
package writes, and the read bandwidth measured on a small buffer."""

from __future__ import annotations

from pagedserve.bench.bandwidth_floor import Floor, read_bandwidth, weight_bytes_per_token


def test_weight_bytes_count_what_a_decode_step_reads(tmp_path) -> None:
    """A GGUF written by the gguf package: an untied file's embedding is not read by a step (a
    lookup reads one row), a tied one's is (it is the LM head); quantized tensors count their
    stored bytes, dense counts elements times the dense width."""
    import gguf
    import numpy as np

    def write(path, names: list[str]) -> None:
        w = gguf.GGUFWriter(str(path), "llama")
        for name in names:
            codes = gguf.quantize(np.ones((8, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, codes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    q8_bytes = 8 * 64 // 32 * 34  # 34 bytes a block of 32
    write(tmp_path / "untied.gguf", ["token_embd.weight", "blk.0.ffn_up.weight", "output.weight"])
    write(tmp_path / "tied.gguf", ["token_embd.weight", "blk.0.ffn_up.weight"])
    assert weight_bytes_per_token(tmp_path / "untied.gguf") == 2 * q8_bytes
    assert weight_bytes_per_token(tmp_path / "tied.gguf") == 2 * q8_bytes
    assert weight_bytes_per_token(tmp_path / "untied.gguf", dense_bytes=2) == 2 * 8 * 64 * 2
    write(tmp_path / "one.gguf", ["token_embd.weight", "output.weight"])
    assert weight_bytes_per_token(tmp_path / "one.gguf") == q8_bytes


def test_read_bandwidth_is_a_plausible_rate_and_the_floor_divides_by_it() -> None:
    rate = read_bandwidth(gib=1 / 64, repeats=2)
    assert 1e8 < rate < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s
    floor = Floor(weight_bytes=10**9, read_bytes_per_s=5e10)
    assert floor.ms_per_token == 20.0 and floor.times(50.0) == 2.5
