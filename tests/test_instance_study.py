"""The instance study's split / merge measurements on hand-made maps.

Every expected value is counted by hand from the small arrays below; no
model, checkpoint or sampling is involved (the JAX part only produces the
decoded maps these functions read).
"""

import numpy as np
import pytest

from configs import synthetic
from pix2seq_d_jax import config_lib, instance_study

# Classes: 0 void, 1 and 2 things, 3 stuff.
IS_THING = np.array([False, True, True, False])


def _stats(gt_sem, gt_inst, pred_sem, pred_inst, **kwargs):
  kwargs = {"is_thing": IS_THING, "min_pixels": 2, "part": 0.2, **kwargs}
  return instance_study.segment_stats(
      np.array(gt_sem), np.array(gt_inst), np.array(pred_sem),
      np.array(pred_inst), **kwargs)


# One thing (class 1, id 3, 8 pixels) left of a stuff band (class 3).
GT_SEM = [[1, 1, 1, 1, 3, 3],
          [1, 1, 1, 1, 3, 3]]
GT_INST = [[3, 3, 3, 3, 0, 0],
           [3, 3, 3, 3, 0, 0]]


def test_a_thing_split_50_50_is_split_with_two_ids():
  s = _stats(GT_SEM, GT_INST, GT_SEM,
             [[4, 4, 5, 5, 0, 0],
              [4, 4, 5, 5, 0, 0]])
  assert s["classes"].tolist() == [1]
  assert s["pixels"].tolist() == [8]
  assert s["split"].tolist() == [True]
  assert s["ids_per_thing"].tolist() == [2]
  assert s["merged"].tolist() == [False]
  assert s["class_acc"].tolist() == [1.0]


def test_an_id_below_part_does_not_split():
  # Id 5 has 1 of 8 pixels (0.125 < 0.2); at part=0.1 it covers.
  pred = [[4, 4, 4, 4, 0, 0],
          [4, 4, 4, 5, 0, 0]]
  s = _stats(GT_SEM, GT_INST, GT_SEM, pred)
  assert s["split"].tolist() == [False]
  assert s["ids_per_thing"].tolist() == [1]
  s = _stats(GT_SEM, GT_INST, GT_SEM, pred, part=0.1)
  assert s["split"].tolist() == [True]
  assert s["ids_per_thing"].tolist() == [2]


def test_an_exact_share_covers():
  # 3 of 15 pixels is exactly part=0.2 (0.2 * 15 is 3.0000000000000004).
  gt_sem = [[1] * 15]
  gt_inst = [[1] * 15]
  s = _stats(gt_sem, gt_inst, gt_sem, [[2] * 12 + [7] * 3])
  assert s["ids_per_thing"].tolist() == [2]
  assert s["split"].tolist() == [True]


def test_two_same_class_things_with_one_id_are_both_merged():
  gt_sem = [[1, 1, 1, 1, 1, 1]]
  gt_inst = [[2, 2, 2, 5, 5, 5]]
  s = _stats(gt_sem, gt_inst, gt_sem, [[7, 7, 7, 7, 7, 7]])
  assert s["merged"].tolist() == [True, True]
  assert s["split"].tolist() == [False, False]
  assert s["ids_per_thing"].tolist() == [1, 1]


def test_one_id_over_things_of_different_classes_is_not_a_merge():
  gt_sem = [[1, 1, 1, 2, 2, 2]]
  gt_inst = [[2, 2, 2, 5, 5, 5]]
  s = _stats(gt_sem, gt_inst, gt_sem, [[7, 7, 7, 7, 7, 7]])
  assert s["merged"].tolist() == [False, False]


def test_merge_uses_the_dominant_id_only():
  # Thing A (id 2): votes 7, 7, 8 -> dominant 7. Thing B (id 5): votes
  # 8, 8, 7 -> dominant 8. Both see both ids, but not merged.
  gt_sem = [[1, 1, 1, 1, 1, 1]]
  gt_inst = [[2, 2, 2, 5, 5, 5]]
  s = _stats(gt_sem, gt_inst, gt_sem, [[7, 7, 8, 8, 8, 7]])
  assert s["merged"].tolist() == [False, False]
  # A tie goes to the smaller id: A votes 7, 8 -> 7, and B's dominant 7.
  s = _stats([[1, 1, 1, 1, 1]], [[2, 2, 5, 5, 5]], [[1, 1, 1, 1, 1]],
             [[8, 7, 7, 7, 8]])
  assert s["merged"].tolist() == [True, True]


def test_a_correct_prediction_is_neither_split_nor_merged():
  gt_sem = [[1, 1, 2, 2, 3],
            [1, 1, 2, 2, 3],
            [1, 1, 1, 1, 3]]
  gt_inst = [[1, 1, 4, 4, 0],
             [1, 1, 4, 4, 0],
             [6, 6, 6, 6, 0]]
  # The same segments under other ids (ids carry no meaning).
  pred_inst = [[9, 9, 2, 2, 0],
               [9, 9, 2, 2, 0],
               [3, 3, 3, 3, 0]]
  s = _stats(gt_sem, gt_inst, gt_sem, pred_inst)
  assert s["classes"].tolist() == [1, 1, 2]  # (1, 1), (1, 6), (2, 4)
  assert s["pixels"].tolist() == [4, 4, 4]
  assert s["split"].tolist() == [False] * 3
  assert s["merged"].tolist() == [False] * 3
  assert s["ids_per_thing"].tolist() == [1, 1, 1]
  assert s["class_acc"].tolist() == [1.0] * 3
  assert (s["labelled_pixels"], s["semantic_correct"]) == (15, 15)
  row = instance_study.summarize_step([s])
  assert row["things"] == 3
  assert (row["split"], row["merged"]) == (0.0, 0.0)
  assert (row["class_acc"], row["semantic_acc"]) == (1.0, 1.0)
  assert row["ids_per_thing"] == 1.0
  assert row["instance_change"] == 0.0


def test_a_thing_below_min_pixels_is_not_counted():
  gt_sem = [[1, 1, 1, 2, 0]]
  gt_inst = [[3, 3, 3, 4, 0]]
  # Thing (2, 4) has 1 pixel < min_pixels=2: only (1, 3) is counted.
  s = _stats(gt_sem, gt_inst, gt_sem, [[5, 5, 5, 5, 0]])
  assert s["classes"].tolist() == [1]
  assert s["pixels"].tolist() == [3]
  assert s["thing_pixels"] == 3
  s = _stats(gt_sem, gt_inst, gt_sem, [[5, 5, 5, 5, 0]], min_pixels=4)
  assert s["classes"].tolist() == []
  assert s["thing_pixels"] == 0
  assert instance_study.summarize_step([s])["split"] is None


def test_stuff_void_and_crowd_are_not_things():
  # Stuff (3) with an id, void (0) with an id, crowd (thing class, id 0).
  gt_sem = [[3, 3, 0, 0, 1, 1]]
  gt_inst = [[7, 7, 8, 8, 0, 0]]
  s = _stats(gt_sem, gt_inst, gt_sem, [[1, 2, 1, 2, 1, 2]])
  assert s["classes"].tolist() == []
  # Labelled: stuff 2 + crowd 2 pixels, all of the right class.
  assert (s["labelled_pixels"], s["semantic_correct"]) == (4, 4)


def test_id_0_and_wrong_class_pixels_do_not_vote():
  gt_sem = [[1] * 10]
  gt_inst = [[4] * 10]
  # 4 px right class id 0, 3 px class 2 with id 7, 3 px right class id 2.
  pred_sem = [[1, 1, 1, 1, 2, 2, 2, 1, 1, 1]]
  pred_inst = [[0, 0, 0, 0, 7, 7, 7, 2, 2, 2]]
  s = _stats(gt_sem, gt_inst, pred_sem, pred_inst)
  assert s["ids_per_thing"].tolist() == [1]  # Only id 2 (3 of 10).
  assert s["split"].tolist() == [False]
  assert s["class_acc"].tolist() == [0.7]
  assert (s["labelled_pixels"], s["semantic_correct"]) == (10, 7)
  # A wrong-class id does not merge two things either.
  gt_sem = [[1, 1, 1, 1, 1, 1]]
  gt_inst = [[2, 2, 2, 5, 5, 5]]
  s = _stats(gt_sem, gt_inst, [[2, 2, 1, 1, 1, 1]], [[7, 7, 8, 8, 7, 7]])
  # A votes only 8 (its id-7 pixels are class 2); B votes 8, 7, 7 -> 7.
  assert s["merged"].tolist() == [False, False]
  assert s["ids_per_thing"].tolist() == [1, 2]
  assert s["class_acc"].tolist() == [pytest.approx(1 / 3), 1.0]


def test_instance_change_counts_thing_pixels_between_steps():
  gt_sem = [[1, 1, 1, 1, 3, 3]]
  gt_inst = [[3, 3, 3, 3, 0, 0]]
  prev = [[5, 5, 5, 5, 0, 0]]
  # Two thing pixels change id; a stuff pixel's change is not counted.
  cur = [[5, 6, 6, 5, 0, 9]]
  s = _stats(gt_sem, gt_inst, gt_sem, cur, prev_instance=np.array(prev))
  assert (s["thing_pixels"], s["instance_changed"]) == (4, 2)
  assert _stats(gt_sem, gt_inst, gt_sem, cur)["instance_changed"] == 0
  row = instance_study.summarize_step([s, s])
  assert row["instance_change"] == 0.5


def test_summarize_step_pools_images_and_tracks_new_and_gone_splits():
  split = _stats(GT_SEM, GT_INST, GT_SEM, [[4, 4, 5, 5, 0, 0]] * 2)
  whole = _stats(GT_SEM, GT_INST, GT_SEM, [[4, 4, 4, 4, 0, 0]] * 2)
  wrong = _stats(GT_SEM, GT_INST, [[2, 2, 1, 1, 3, 3]] * 2,
                 [[4, 4, 4, 4, 0, 0]] * 2)
  first = instance_study.summarize_step([split, whole, wrong])
  assert first["things"] == 3
  assert first["split"] == pytest.approx(1 / 3)
  assert first["split_new"] == pytest.approx(1 / 3)
  assert first["split_gone"] == 0.0
  assert first["ids_per_thing"] == pytest.approx(4 / 3)
  assert first["class_acc"] == pytest.approx((1 + 1 + 0.5) / 3)
  # 12 labelled pixels per image; the third gets 4 class-1 pixels wrong.
  assert first["semantic_acc"] == pytest.approx(32 / 36)
  assert first["split_flags"].tolist() == [True, False, False]
  second = instance_study.summarize_step([whole, split, wrong],
                                         first["split_flags"])
  assert second["split"] == pytest.approx(1 / 3)
  assert second["split_new"] == pytest.approx(1 / 3)
  assert second["split_gone"] == pytest.approx(1 / 3)


def test_track_things_counts_any_final_resolved_and_onset():
  # Things: 0 split from step 1 on; 1 split at step 0 only (resolved);
  # 2 never split; 3 split throughout. Merges: thing 2 at the end only.
  split = np.array([[0, 1, 0, 1],
                    [1, 0, 0, 1],
                    [1, 0, 0, 1],
                    [1, 0, 0, 1]], bool)
  merged = np.zeros_like(split)
  merged[3, 2] = True
  m = instance_study.track_things(split, merged)
  assert m["things"] == 4
  assert (m["split_any"], m["split_final"], m["split_resolved"]) == (
      0.75, 0.5, 0.25)
  assert m["split_onset"] == 0.5  # Steps 1 and 0.
  assert (m["merged_any"], m["merged_final"], m["merged_resolved"]) == (
      0.25, 0.25, 0.0)
  none = instance_study.track_things(np.zeros((3, 2), bool),
                                     np.zeros((3, 2), bool))
  assert none["split_onset"] is None


def test_mismatched_maps_are_refused():
  with pytest.raises(ValueError, match="one shape"):
    _stats(GT_SEM, GT_INST, GT_SEM, [[0, 0]])
  with pytest.raises(ValueError, match="outside is_thing"):
    _stats([[9, 9]], [[1, 1]], [[1, 1]], [[1, 1]])


@pytest.mark.parametrize("kwargs, flag", [
    ({"part": 1.5}, "--part=1.5"),
    ({"part": 0.0}, "--part=0.0"),
    ({"part": 0.6}, "--part=0.6"),
    ({"max_images": 0}, "--max_images=0"),
    ({"max_images": 2.5}, "--max_images=2.5"),
    ({"min_pixels": 0}, "--min_pixels=0"),
])
def test_bad_options_name_the_flag(kwargs, flag):
  args = {"max_images": 10, "part": 0.2, "min_pixels": None, **kwargs}
  with pytest.raises(config_lib.ConfigError, match=flag.replace(".", r"\.")):
    instance_study.check_args(**args)


def test_good_options_pass_and_study_checks_them_first():
  instance_study.check_args(max_images=1, part=0.5, min_pixels=1)
  # The options are checked before the workdir or the data are touched.
  with pytest.raises(config_lib.ConfigError, match="--part=1.5"):
    instance_study.study(synthetic.get_config("tiny"), "/nonexistent",
                         part=1.5)


def test_output_folder_must_exist(tmp_path):
  instance_study._check_output(str(tmp_path / "study.json"))
  with pytest.raises(config_lib.ConfigError, match="--output="):
    instance_study._check_output(str(tmp_path / "missing" / "study.json"))


def test_min_pixels_default_scales_the_eval_rule_to_the_mask():
  config = synthetic.get_config()
  # 16 original pixels at a 64 -> 32 mask: 16 / 4.
  assert instance_study.mask_min_pixels(config) == 4
  config.evals.panoptic.min_pixels = 1
  assert instance_study.mask_min_pixels(config) == 1  # At least 1.


def test_format_report_prints_every_step_and_the_final_row():
  s = _stats(GT_SEM, GT_INST, GT_SEM, [[4, 4, 5, 5, 0, 0]] * 2)
  row = instance_study.summarize_step([s])
  flags = row.pop("split_flags"), row.pop("merged_flags")
  result = {
      "setting": {"images": 1, "things": 1, "min_pixels": 2, "part": 0.2,
                  "sample_steps": 1, "td": 0.0, "sampler": "ddim",
                  "self_cond": False},
      "steps": [{"step": 0, "t": 1.0, **row}],
      "final": {"step": "final", "t": 0.0, **row},
      "summary": instance_study.track_things(
          np.stack([flags[0], flags[0]]), np.stack([flags[1], flags[1]])),
  }
  lines = instance_study.format_report(result).splitlines()
  assert len(lines) == 5  # Setting, header, step 0, final, summary.
  assert lines[1].split()[:4] == ["step", "t", "split", "split_new"]
  assert lines[2].split()[:3] == ["0", "1.000", "1.000"]
  assert lines[3].split()[0] == "final"
  assert "split: any step 1.000, final 1.000, resolved 0.000" in lines[4]
