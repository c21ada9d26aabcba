"""The input benchmark runs and counts images (the real measurement is in the report)."""

from benchmarks import input_data


def test_benchmark_counts_images(tmp_path, monkeypatch):
  monkeypatch.setattr(input_data, "build_benchmark_dataset",
                      lambda data_dir, **kw: _tiny(data_dir))
  for mode in ("lsj", "resize"):
    c = input_data.benchmark_data_config(str(tmp_path), mode=mode)
    c.image_size, c.max_size, c.train_min_size_range = 128, 160, (96, 96)
    result = input_data.input_images_per_second(c, seconds=0.3, batch_size=4, warmup_batches=1)
    assert result.images >= 4 and result.images % 4 == 0
    assert result.cores >= 1
    assert abs(result.images_per_second_per_core * result.cores - result.images_per_second) < 1e-6


_BUILT = input_data.build_benchmark_dataset


def _tiny(data_dir):
  return _BUILT(data_dir, num_images=6, height=72, width=96)
