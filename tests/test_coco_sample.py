"""The COCO 2017 sample: how it is made (tools/make_coco_sample.py),
what is shipped (smallbn_d2/data/coco_2017_sample) and its registration (register_coco_sample)."""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from smallbn_d2.data import (SAMPLE_ROOT, DatasetsNotFoundError, SampleRegistrationError, coco_sample_files,
                             register_coco_sample)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "make_coco_sample.py")


def load_tool():
    """tools/make_coco_sample.py as a module (the tool holds the sample maker; not in the package)."""
    spec = importlib.util.spec_from_file_location("make_coco_sample_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


_maker = load_tool()
encode_uncompressed_rle, make_coco_sample, rescale_annotation = (_maker.encode_uncompressed_rle, _maker.make_coco_sample,
                                                                 _maker.rescale_annotation)
resize_rle, resized_shape, select_images = _maker.resize_rle, _maker.resized_shape, _maker.select_images
SPLITS = ("train2017", "val2017")


def decode(segm, h, w):
    rle = mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else dict(
        segm, counts=segm["counts"].encode())
    return mask_util.decode(rle)


# ------------------------------------------------------------------------------ RLE and rescaling
def test_uncompressed_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    for h, w, first in [(7, 5, 0), (6, 9, 1), (1, 1, 1), (4, 3, 0)]:
        m = (rng.random((h, w)) > 0.5).astype(np.uint8)
        m[0, 0] = first
        rle = encode_uncompressed_rle(m)
        assert rle["size"] == [h, w] and sum(rle["counts"]) == h * w
        assert all(isinstance(c, int) for c in rle["counts"])
        np.testing.assert_array_equal(decode(rle, h, w), m)


def block_mask(small, k):
    """A mask of k x k blocks: nearest-neighbour downscaling by k gives ``small`` back, whichever
    pixel of each block is sampled."""
    return np.kron(small, np.ones((k, k), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["uncompressed", "compressed"])
def test_resize_rle_is_nearest_neighbour_and_keeps_the_format(fmt):
    rng = np.random.default_rng(1)
    big = (rng.random((15, 24)) > 0.4).astype(np.uint8)
    if fmt == "uncompressed":
        segm = encode_uncompressed_rle(big)
    else:
        enc = mask_util.encode(np.asfortranarray(big))
        segm = {"size": enc["size"], "counts": enc["counts"].decode()}
    out = resize_rle(segm, 15, 24, 5, 8)
    assert isinstance(out["counts"], list) == (fmt == "uncompressed")
    assert out["size"] == [5, 8]
    # nearest neighbour at 1/3: output pixel i samples the input pixel under its centre, 3 i + 1
    np.testing.assert_array_equal(decode(out, 5, 8), big[1::3, 1::3])
    with pytest.raises(ValueError, match=r"RLE size \[15, 24\] is invalid"):
        resize_rle(segm, 24, 15, 8, 5)


def test_rescale_polygon_annotation_by_the_formula():
    ann = {"id": 7, "image_id": 3, "category_id": 18, "iscrowd": 0, "area": 1000.0,
           "bbox": [10.0, 20.0, 100.0, 50.0], "segmentation": [[10.0, 20.0, 110.0, 20.0, 110.0, 70.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]}
    before = json.dumps(ann)
    h, w, nh, nw = 427, 640, 214, 320
    sx, sy = nw / w, nh / h
    out = rescale_annotation(ann, h, w, nh, nw)
    assert json.dumps(ann) == before  # input unchanged
    assert {k: out[k] for k in ("id", "image_id", "category_id", "iscrowd")} == {"id": 7, "image_id": 3,
                                                                                   "category_id": 18, "iscrowd": 0}
    np.testing.assert_allclose(out["bbox"], [10 * sx, 20 * sy, 100 * sx, 50 * sy], atol=0.005)
    for poly, ref in zip(out["segmentation"], ann["segmentation"]):
        np.testing.assert_allclose(poly[0::2], np.array(ref[0::2]) * sx, atol=0.005)
        np.testing.assert_allclose(poly[1::2], np.array(ref[1::2]) * sy, atol=0.005)
    assert out["area"] == pytest.approx(1000.0 * sx * sy, rel=1e-6)


def test_rescale_crowd_annotation_resizes_its_mask():
    rng = np.random.default_rng(2)
    small = (rng.random((6, 10)) > 0.5).astype(np.uint8)
    ann = {"id": 9, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 77,
           "bbox": [2, 4, 12, 6], "segmentation": encode_uncompressed_rle(block_mask(small, 3))}
    out = rescale_annotation(ann, 18, 30, 6, 10)
    assert isinstance(out["segmentation"]["counts"], list)  # the official files' format
    np.testing.assert_array_equal(decode(out["segmentation"], 6, 10), small)
    assert out["bbox"] == pytest.approx([2 / 3, 4 / 3, 4, 2], abs=0.005)
    assert out["area"] == pytest.approx(77 / 9, abs=1e-4)  # stored with 4 decimals


def test_resized_shape():
    assert resized_shape(427, 640, 320) == (214, 320)
    assert resized_shape(640, 480, 320) == (320, 240)
    assert resized_shape(200, 100, 320) == (200, 100)  # never enlarged
    with pytest.raises(ValueError, match="max_size=0 is invalid"):
        resized_shape(10, 10, 0)


# ------------------------------------------------------------------------------ selection
def synthetic_coco(n_images=8):
    licenses = [{"id": 1, "name": "Attribution License", "url": "u1"},
                {"id": 3, "name": "Attribution-NonCommercial-NoDerivs License", "url": "u3"}]
    images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "height": 48, "width": 64,
               "license": 3 if i == 2 else 1, "coco_url": f"c{i}", "flickr_url": f"f{i}"} for i in range(n_images)]
    anns = []
    for i, im in enumerate(images):
        if i == 4:
            continue  # no annotation
        crowd_only = i == 5
        anns.append({"id": 1000 + i, "image_id": im["id"], "category_id": 1 + i % 2, "iscrowd": int(crowd_only),
                     "area": 96.0, "bbox": [8.0, 8.0, 16.0, 12.0],
                     "segmentation": encode_uncompressed_rle(np.pad(np.ones((12, 16), np.uint8), ((8, 28), (8, 40))))
                     if crowd_only else [[8.0, 8.0, 24.0, 8.0, 24.0, 20.0, 8.0, 20.0]]})
    # image 7 has a non-crowd object and a crowd region
    anns.append({"id": 2000, "image_id": 107, "category_id": 1, "iscrowd": 1, "area": 64, "bbox": [0, 0, 8, 8],
                 "segmentation": encode_uncompressed_rle(np.pad(np.ones((8, 8), np.uint8), ((0, 40), (0, 56))))})
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 2, "name": "bicycle", "supercategory": "vehicle"}]
    return {"info": {"description": "synthetic"}, "licenses": licenses, "images": images, "annotations": anns,
            "categories": categories}


def test_selection_rules():
    coco = synthetic_coco()
    # candidates: an object, not NoDerivs -> ids 100, 101, 103, 106, 107 (102 NoDerivs, 104 none, 105 crowd only)
    picks = select_images(coco, 2)
    assert [im["id"] for im in picks] == [100, 107]  # evenly spaced [100, 103], last pick -> the crowd image
    assert select_images(coco, 2) == picks  # deterministic
    assert [im["id"] for im in select_images(coco, 5)] == [100, 101, 103, 106, 107]
    assert 102 in [im["id"] for im in select_images(coco, 6, allow_no_derivatives=True)]
    with pytest.raises(ValueError, match="asked for 6 images but only 5"):
        select_images(coco, 6)


# ------------------------------------------------------------------------------ the whole tool
def write_coco_root(root, coco_by_split):
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, coco in coco_by_split.items():
        (root / split).mkdir()
        for im in coco["images"]:
            pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / im["file_name"], quality=95)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    write_coco_root(root, {split: synthetic_coco() for split in SPLITS})
    return root


class ToolResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_tool(*args):
    """The tool's main() in this process (a subprocess would import torch and Detectron2 again)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            load_tool().main([str(a) for a in args])
        except SystemExit as e:  # sys.exit("make_coco_sample.py: error: ...")
            code = e.code if isinstance(e.code, int) else 1
            err.write("" if e.code is None or isinstance(e.code, int) else str(e.code))
    return ToolResult(code, out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_tool_help_runs_as_a_command():
    proc = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--coco-root" in proc.stdout and "--output" in proc.stdout and "--overwrite" in proc.stdout


def test_tool_writes_a_detectron2_layout_and_guards_the_output(coco_root, tmp_path):
    out = tmp_path / "sample"
    proc = run_tool("--coco-root", coco_root, "--output", out, "--num-train", 3, "--num-val", 2, "--max-size", 32)
    assert proc.returncode == 0, proc.stderr
    for split, n in (("train2017", 3), ("val2017", 2)):
        src = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        got = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert list(got) == list(src)  # info, licenses, images, annotations, categories
        assert got["info"] == src["info"] and got["licenses"] == src["licenses"]
        assert got["categories"] == src["categories"]
        assert len(got["images"]) == n and any(a["iscrowd"] for a in got["annotations"])
        src_images = {im["id"]: im for im in src["images"]}
        for im in got["images"]:
            ref = src_images[im["id"]]
            assert (im["height"], im["width"]) == (24, 32)
            assert {k: v for k, v in im.items() if k not in ("height", "width")} == \
                   {k: v for k, v in ref.items() if k not in ("height", "width")}
            with Image.open(out / split / im["file_name"]) as img:
                assert img.size == (32, 24) and img.format == "JPEG"
        ids = {im["id"] for im in got["images"]}
        assert [a["id"] for a in got["annotations"]] == [a["id"] for a in src["annotations"] if a["image_id"] in ids]
    assert (out / "README.md").is_file() and "--coco-root COCO_ROOT" in (out / "README.md").read_text()
    assert str(coco_root) not in (out / "README.md").read_text()

    before = sorted(p.name for p in out.rglob("*"))
    proc = run_tool("--coco-root", coco_root, "--output", out, "--num-train", 2)
    assert proc.returncode != 0 and "is not empty" in proc.stderr and "--overwrite" in proc.stderr
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing lost
    proc = run_tool("--coco-root", coco_root, "--output", out, "--num-train", 2, "--num-val", 2, "--max-size", 32,
                    "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "train2017").iterdir())) == 2  # replaced, no image of the first sample left

    (out / "notes.txt").write_text("mine")
    proc = run_tool("--coco-root", coco_root, "--output", out, "--overwrite")
    assert proc.returncode != 0 and "notes.txt" in proc.stderr and (out / "notes.txt").read_text() == "mine"
    proc = run_tool("--coco-root", coco_root, "--output", coco_root / "sample")
    assert proc.returncode != 0 and "overlaps --coco-root" in proc.stderr


def test_ids_from_rebuilds_the_same_images(coco_root, tmp_path):
    first = make_coco_sample(coco_root, tmp_path / "a", num_train=3, num_val=2, max_size=32)
    assert [s.images for s in first] == [3, 2]
    make_coco_sample(coco_root, tmp_path / "b", max_size=32, ids_from=tmp_path / "a")
    for split in SPLITS:
        a = json.loads((tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text())
        b = json.loads((tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text())
        assert a == b


# ------------------------------------------------------------------------------ the shipped sample
def load_sample(split):
    return json.loads((SAMPLE_ROOT / "annotations" / f"instances_{split}.json").read_text())


def test_shipped_sample_is_complete_small_and_well_formed():
    total = sum(p.stat().st_size for p in SAMPLE_ROOT.rglob("*") if p.is_file())
    assert total < 5e6, f"the sample is {total / 1e6:.2f} MB"
    readme = (SAMPLE_ROOT / "README.md").read_text()
    assert "CC BY 4.0" in readme and "termsofuse" in readme and "tools/make_coco_sample.py" in readme
    for split in SPLITS:
        coco = load_sample(split)
        assert len(coco["images"]) == 24 and len(coco["categories"]) == 80
        assert coco["info"]["description"] == "COCO 2017 Dataset" and len(coco["licenses"]) == 8
        files = sorted(os.listdir(SAMPLE_ROOT / split))
        assert files == sorted(im["file_name"] for im in coco["images"])
        sizes = {}
        for im in coco["images"]:
            with Image.open(SAMPLE_ROOT / split / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]), im["file_name"]
            assert max(im["width"], im["height"]) <= 320
            assert im["coco_url"].endswith(f"{split}/{im['file_name']}") and im["flickr_url"] and "license" in im
            sizes[im["id"]] = (im["height"], im["width"])
        crowd = [a for a in coco["annotations"] if a["iscrowd"]]
        assert crowd, f"{split}: no crowd annotation"
        for a in crowd:
            h, w = sizes[a["image_id"]]
            assert a["segmentation"]["size"] == [h, w] and isinstance(a["segmentation"]["counts"], list)
            assert sum(a["segmentation"]["counts"]) == h * w
        for a in coco["annotations"]:
            h, w = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            assert -0.01 <= x and -0.01 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01, a["id"]
            if not a["iscrowd"]:
                xs = [v for poly in a["segmentation"] for v in poly[0::2]]
                assert max(xs) <= w + 0.01


def source_coco_root():
    root = os.path.join(os.path.expanduser(os.environ.get("DETECTRON2_DATASETS") or "datasets"), "coco")
    return root if os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")) else None


@pytest.mark.coco_subset
def test_shipped_sample_is_the_source_rescaled():
    """Against the COCO 2017 files it was made from: same ids, annotations scaled by the formula,
    images a downscaled copy (compared with an independent PIL bilinear resize of the source)."""
    root = source_coco_root()
    for split in SPLITS:
        src = json.loads(open(os.path.join(root, "annotations", f"instances_{split}.json")).read())
        got = load_sample(split)
        src_images = {im["id"]: im for im in src["images"]}
        src_anns = {a["id"]: a for a in src["annotations"]}
        ids = {im["id"] for im in got["images"]}
        assert ids <= set(src_images)
        assert sorted(a["id"] for a in got["annotations"]) == sorted(a["id"] for a in src["annotations"]
                                                                    if a["image_id"] in ids)
        for im in got["images"]:
            ref = src_images[im["id"]]
            with Image.open(os.path.join(root, split, ref["file_name"])) as big, \
                    Image.open(SAMPLE_ROOT / split / im["file_name"]) as small:
                expected = np.asarray(big.convert("RGB").resize(small.size, Image.Resampling.BILINEAR), np.float32)
                diff = np.abs(np.asarray(small.convert("RGB"), np.float32) - expected).mean()
            assert diff < 12, (im["file_name"], diff)
        for a in got["annotations"]:
            ref, im = src_anns[a["id"]], src_images[a["image_id"]]
            new = next(i for i in got["images"] if i["id"] == a["image_id"])
            sx, sy = new["width"] / im["width"], new["height"] / im["height"]
            x, y, w, h = ref["bbox"]
            np.testing.assert_allclose(a["bbox"], [x * sx, y * sy, w * sx, h * sy], atol=0.006)
            assert a["area"] == pytest.approx(ref["area"] * sx * sy, rel=1e-4, abs=1e-3)
            assert a["category_id"] == ref["category_id"] and a["iscrowd"] == ref["iscrowd"]


# ------------------------------------------------------------------------------ registration
def test_register_coco_sample_is_idempotent_and_coco_evaluable():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = register_coco_sample()
    assert names == ("coco_2017_sample_train", "coco_2017_sample_val")
    assert register_coco_sample() == names  # a second call does nothing
    for name, (json_file, image_root) in coco_sample_files().items():
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco" and meta.json_file == json_file and meta.image_root == image_root
        assert os.path.isabs(json_file) and len(meta.thing_classes) == 80
    dicts = DatasetCatalog.get("coco_2017_sample_val")
    assert len(dicts) == 24 and all(os.path.isfile(d["file_name"]) for d in dicts)
    crowd = [a for d in dicts for a in d["annotations"] if a.get("iscrowd")]
    assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)


def test_register_coco_sample_refuses_other_files_under_its_names(tmp_path):
    register_coco_sample()
    copy = tmp_path / "copy"
    shutil.copytree(SAMPLE_ROOT, copy)
    with pytest.raises(SampleRegistrationError, match="coco_2017_sample_train.*already registered") as info:
        register_coco_sample(copy)
    assert str(SAMPLE_ROOT) in str(info.value) and str(copy) in str(info.value)
    with pytest.raises(DatasetsNotFoundError, match="coco_2017_sample_train"):
        register_coco_sample(tmp_path / "empty")
