"""Byte I/O against the real S3 server on loopback, through the same code path as local files."""

import hashlib
import os

import numpy as np
import pytest

from cxr.config import PrepareDataConfig
from cxr.data.decode import decode_image
from cxr.data.errors import BadImageError
from cxr.data.manifest import read_manifest
from cxr.data.storage import StorageConfig, list_files, read_bytes, write_bytes
from jobs import prepare_data


def test_s3_listing_matches_local_folder(storage, sample_bucket, sample_root):
    local = list_files(str(sample_root / "covid" / "images"))
    remote = list_files(f"{sample_bucket}/covid/images", storage)
    assert len(remote) == len(local) > 0
    assert [u.rsplit("/", 1)[1] for u in remote] == [p.rsplit("/", 1)[1] for p in local]
    assert all(u.startswith("s3://cxr-sample/data/covid/images/") for u in remote)


def test_real_images_read_from_s3_equal_local(storage, sample_bucket, sample_root):
    for local in list_files(str(sample_root / "lungseg" / "images"))[:5]:
        name = local.rsplit("/", 1)[1]
        remote = f"{sample_bucket}/lungseg/images/{name}"
        data = read_bytes(remote, storage)
        assert hashlib.sha256(data).digest() == hashlib.sha256(read_bytes(local)).digest()
        assert np.array_equal(decode_image(data, remote), decode_image(read_bytes(local), local))


def test_missing_and_oversized_objects_raise_bad_image(storage, sample_bucket):
    with pytest.raises(BadImageError, match="not found"):
        read_bytes(f"{sample_bucket}/nope.jpg", storage)
    some = list_files(f"{sample_bucket}/covid/images", storage)[0]
    with pytest.raises(BadImageError, match="too large"):
        read_bytes(some, storage, max_bytes=10)


def test_write_then_read_roundtrip(storage, local_stack):
    local_stack.create_bucket("cxr-scratch")
    write_bytes("s3://cxr-scratch/a/b/c.bin", b"hello", storage)
    assert read_bytes("s3://cxr-scratch/a/b/c.bin", storage) == b"hello"


def test_unreachable_endpoint_fails_loudly():
    dead = StorageConfig(s3_endpoint="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=0.5, request_timeout_s=0.5)
    with pytest.raises(OSError):
        read_bytes("s3://bucket/key.jpg", dead)


def test_prepare_data_on_an_s3_prefix_and_to_s3(local_stack, sample_bucket, storage):
    """The job reads the endpoint from the environment (set by the stack fixture), as deployed."""
    local_stack.create_bucket("cxr-out")
    cfg = PrepareDataConfig(images=f"{sample_bucket}/covid/images", out="s3://cxr-out/manifests")
    assert prepare_data.main(cfg) == 0
    df = read_manifest("s3://cxr-out/manifests/manifest.parquet", storage)
    assert len(df) == 36 and df["sha256"].notna().all() and df["uri"].str.startswith("s3://").all()


def test_odd_local_names_and_dead_links_are_listed_and_get_a_reason(tmp_path, sample_root):
    """A file name that is not UTF-8 and a link that leads nowhere: each is an input with a row
    that says why, never a listing that fails or skips it silently."""
    from cxr.data.storage import list_entries
    from cxr.scoring import decode_batch

    real = sorted((sample_root / "covid").rglob("*.jpg"))[0]
    (tmp_path / "good.jpg").write_bytes(real.read_bytes())
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:
        f.write(real.read_bytes())
    (tmp_path / "dead.jpg").symlink_to(tmp_path / "nowhere.jpg")
    listing = list_entries(str(tmp_path))
    assert listing.num_rows == 3
    rows = decode_batch(listing.to_pydict() | {"uri": np.array(listing["uri"].to_pylist(), dtype=object)},
                        (64, None), 128, set(), 10**7, None)
    reasons = dict(zip(rows["uri"], rows["error"]))
    assert reasons[str(tmp_path / "good.jpg")] is None
    assert reasons[str(tmp_path / "dead.jpg")].endswith("file not found")
    assert "not valid UTF-8" in reasons[str(tmp_path / "caf\\xe9.jpg")]


def test_s3_keys_with_empty_path_components_are_read(local_stack, storage, sample_root):
    """S3 allows ``a//b.jpg``; pyarrow's paths do not: listed, described and read all the same."""
    from cxr.data.storage import list_entries, read_bytes, stat_entries

    local_stack.create_bucket("cxr-odd-keys")
    data = sorted((sample_root / "covid").rglob("*.jpg"))[0].read_bytes()
    local_stack.s3_client().put_object(Bucket="cxr-odd-keys", Key="arch/sub//double.jpg", Body=data)
    uri = "s3://cxr-odd-keys/arch/sub//double.jpg"
    assert list_entries("s3://cxr-odd-keys/arch", storage)["uri"].to_pylist() == [uri]
    assert stat_entries([uri, "s3://cxr-odd-keys/arch/none.jpg"], storage).num_rows == 2   # the listing goes on
    assert read_bytes(uri, storage, 10**7) == data
    with pytest.raises(BadImageError, match="file too large"):
        read_bytes(uri, storage, 100)


def test_folders_linked_into_the_input_are_listed_and_loops_refused_with_a_line(tmp_path, sample_root, caplog):
    """An archive mounted as links: a film, a linked film, a linked folder of films, a link
    loop inside it and a second link to the same folder. Every film is listed once; the loop
    and the repeat are not followed, each with a warning naming it."""
    import logging

    films = sorted(sample_root.rglob("*.jpg"))[:4]
    mounted = tmp_path / "mount"
    mounted.mkdir()
    for f in films[1:]:
        (mounted / f.name).write_bytes(f.read_bytes())
    (mounted / "loop").symlink_to(mounted, target_is_directory=True)       # a link back up: a loop
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / films[0].name).write_bytes(films[0].read_bytes())
    (archive / "linked.jpg").symlink_to(films[0])
    (archive / "studies").symlink_to(mounted, target_is_directory=True)
    (archive / "same-studies").symlink_to(mounted, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="cxr.data.storage"):
        listed = list_files(str(archive))
    assert len(listed) == 2 + len(films[1:]), listed
    assert sum("/studies/" in u or "/same-studies/" in u for u in listed) == len(films[1:])
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "a loop" in messages and "already listed" in messages, messages

    only = tmp_path / "only-links"            # an input holding nothing but a linked folder
    only.mkdir()
    (only / "studies").symlink_to(mounted, target_is_directory=True)
    assert len(list_files(str(only))) == len(films[1:])


def test_a_link_to_a_folder_inside_the_input_never_takes_its_uris(tmp_path, sample_root):
    """``latest -> 2024-05``: the films are listed once, under the real folder, whichever name
    the walk meets first, so URIs do not change when the link moves on."""
    film = sorted(sample_root.rglob("*.jpg"))[0]
    real = tmp_path / "archive" / "2024-05"
    real.mkdir(parents=True)
    (real / "a.jpg").write_bytes(film.read_bytes())
    for name in ("0-latest", "latest"):       # sorting before and after the real folder
        (tmp_path / "archive" / name).symlink_to(real, target_is_directory=True)
    assert list_files(str(tmp_path / "archive")) == [str(real / "a.jpg")]
