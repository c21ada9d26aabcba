"""The input benchmark runs and counts images (the real measurement is in the report)."""

from benchmarks import input_data


def test_benchmark_counts_images(tmp_path):
  for mode in ("lsj", "resize"):
    c = input_data.benchmark_data_config(str(tmp_path), mode=mode, num_images=6, height=72, width=96)
    assert c.name == f"{input_data.BENCHMARK_TFDS_NAME}/h72_w96_n6_s0"  # the size went through
    c.image_size, c.max_size, c.train_min_size_range = 128, 160, (96, 96)
    result = input_data.input_images_per_second(c, seconds=0.3, batch_size=4, warmup_batches=1)
    assert result.images >= 4 and result.images % 4 == 0
    assert result.cores >= 1
    assert abs(result.images_per_second_per_core * result.cores - result.images_per_second) < 1e-6
