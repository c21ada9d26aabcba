"""Label maps: the COCO table, save/load, lookups."""

import pytest

from retinanet_jax.data import COCO_LABEL_MAP, LabelMap, load_label_map, save_label_map


def test_coco_table_has_80_ids_in_1_to_90_with_the_known_gaps():
  ids = COCO_LABEL_MAP.category_ids
  assert len(ids) == 80 and list(ids) == sorted(ids)
  assert sorted(set(range(1, 91)) - set(ids)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
  assert COCO_LABEL_MAP.to_label(90) == 79 and COCO_LABEL_MAP.names[COCO_LABEL_MAP.to_label(72)] == "tv"


def test_save_and_load_round_trip(tmp_path):
  label_map = LabelMap.from_categories([{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}])
  assert label_map.category_ids == (3, 7)
  path = tmp_path / "label_map.json"
  save_label_map(label_map, str(path))
  assert load_label_map(str(path)) == label_map
  assert label_map.coco_categories() == [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]


def test_lookups_and_validation():
  label_map = LabelMap((3, 7), ("dog", "cat"))
  assert [label_map.to_label(label_map.to_category_id(k)) for k in range(2)] == [0, 1]
  with pytest.raises(KeyError, match="category id 5 is not in the label map"):
    label_map.to_label(5)
  with pytest.raises(ValueError, match="must be unique"):
    LabelMap((3, 3), ("a", "b"))
