"""Checkpoints and exports on S3 (``model/storage.py``), against moto's S3 server on 127.0.0.1.

moto runs in server mode: a real HTTP S3 API on a free port that boto3 reaches through
``AWS_ENDPOINT_URL``, as it would MinIO. Credentials come from the environment only. The
wrong-credentials tests switch moto's authentication on (``/moto-api/reset-auth``) and
sign with an IAM user's key whose secret is wrong.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is in the test extra: pip install -e '.[test]'")
boto3 = pytest.importorskip("boto3")
import requests  # noqa: E402  (moto[server] depends on it)
import torch  # noqa: E402

from bench.cli import main  # noqa: E402
from model import storage  # noqa: E402
from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model.gpt import build_model, get_config  # noqa: E402
from model.storage import MANIFEST, StorageError, fetch_checkpoint, upload_checkpoint  # noqa: E402

BUCKET = "bench-test"
SECRET = "not-the-secret-0123456789abcdefghijklmnop"


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines in the output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_url, monkeypatch, tmp_path):
    """A fresh moto state with one bucket, credentials in the environment, a private cache."""
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_checkpoint(build_model(get_config("tiny"), seed=0), tmp_path / "tiny-ckpt")


def _keys(client, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def _complete_in_cache(cache: Path) -> list[Path]:
    """Directories in the cache that a fetch would hand out, <digest>/<name> (temporary ones start with a dot)."""
    return [d for d in (cache / "s3").glob("*/*") if d.is_dir() and not d.parent.name.startswith(".")
            and d.parent.name != "staging"]


def test_upload_then_fetch_is_bit_identical_and_loads(s3, checkpoint, tmp_path):
    uri = f"s3://{BUCKET}/models/tiny"
    assert upload_checkpoint(checkpoint, uri) is True
    assert _keys(s3, "models/tiny/") == [f"models/tiny/{MANIFEST}", "models/tiny/config.json",
                                          "models/tiny/model.safetensors"]
    local = fetch_checkpoint(uri)
    assert local.name == "tiny" and local.is_relative_to(tmp_path / "cache" / "s3")
    for name in ("config.json", "model.safetensors"):
        assert (local / name).read_bytes() == (checkpoint / name).read_bytes()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(load_checkpoint(local)(ids)[0], load_checkpoint(checkpoint)(ids)[0])
    assert upload_checkpoint(checkpoint, uri) is False  # the same files: nothing sent again


def test_a_second_fetch_downloads_nothing_and_a_changed_remote_is_fetched_afresh(s3, checkpoint, tmp_path,
                                                                                 monkeypatch):
    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    downloads = []
    real_client = storage._client

    def counting_client():
        client = real_client()
        download = client.download_file
        client.download_file = lambda bucket, key, path: (downloads.append(key), download(bucket, key, path))
        return client

    monkeypatch.setattr(storage, "_client", counting_client)
    first = fetch_checkpoint(uri)
    assert sorted(downloads) == ["models/tiny/config.json", "models/tiny/model.safetensors"]
    downloads.clear()
    assert fetch_checkpoint(uri) == first and downloads == []

    other = save_checkpoint(build_model(get_config("tiny"), seed=1), tmp_path / "other")
    upload_checkpoint(other, uri)
    second = fetch_checkpoint(uri)
    assert second != first and len(downloads) == 2
    assert (second / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    assert (first / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_a_quantized_checkpoint_round_trips_and_runs_from_s3(s3, checkpoint, tmp_path, capsys):
    from bench.models import open_model

    uri = f"s3://{BUCKET}/models/tiny-int8"
    assert main(["quantize", "--checkpoint", str(checkpoint), "--precision", "int8", "--out", uri]) == 0
    assert f"models/tiny-int8/{MANIFEST}" in _keys(s3, "models/tiny-int8/")
    local = fetch_checkpoint(uri)
    qc = open_model(local, "int8", "int8")  # every tensor checked against its digest
    assert qc.precision == "int8" and qc.backend == "int8"
    capsys.readouterr()
    rc = main(["generate", "--backend", "int8", "--precision", "int8", "--checkpoint", uri, "--prompt-ids", "1,2,3",
               "--max-new-tokens", "4", "--json"])
    assert rc == 0 and len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


def test_a_missing_checkpoint_or_bucket_is_one_clear_line(s3, capsys):
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/nope: no such checkpoint"):
        fetch_checkpoint(f"s3://{BUCKET}/nope")
    with pytest.raises(StorageError, match="no such bucket 'no-such-bucket'"):
        fetch_checkpoint("s3://no-such-bucket/models/tiny")
    rc = main(["generate", "--checkpoint", f"s3://{BUCKET}/nope", "--prompt-ids", "1", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"error: s3://{BUCKET}/nope: no such checkpoint (no objects under this prefix)"


def test_wrong_credentials_are_refused_clearly_and_nothing_is_half_written(s3, checkpoint, moto_url, monkeypatch,
                                                                           tmp_path, capsys):
    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    iam = boto3.client("iam")
    iam.create_user(UserName="bench")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="bench", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="bench")["AccessKey"]
    requests.post(f"{moto_url}/moto-api/reset-auth", data=b"0", timeout=10)  # authenticate every request now
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # not this user's secret
        with pytest.raises(StorageError) as e:
            fetch_checkpoint(uri)
        message = str(e.value)
        assert message.startswith(f"access denied by s3://{BUCKET} (SignatureDoesNotMatch): check "
                                  f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        assert _complete_in_cache(tmp_path / "cache") == []
        rc = main(["run", "--checkpoint", uri, "--backend", "eager"])
        out = capsys.readouterr()
        assert rc == 2 and out.err.count("\n") == 1 and "access denied" in out.err
        for secret in (SECRET, key["SecretAccessKey"], key["AccessKeyId"]):
            assert secret not in message and secret not in out.err + out.out

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])  # the control: right key works
        assert (fetch_checkpoint(uri) / "model.safetensors").is_file()
    finally:
        requests.post(f"{moto_url}/moto-api/reset-auth", data=b"inf", timeout=10)


def test_no_credentials_and_an_unreachable_endpoint(s3, checkpoint, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        fetch_checkpoint(f"s3://{BUCKET}/models/tiny")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port} "
                                           r"\(check AWS_ENDPOINT_URL"):
        upload_checkpoint(checkpoint, f"s3://{BUCKET}/models/tiny")


def test_an_interrupted_upload_is_refused_and_leaves_no_complete_cache(s3, checkpoint, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    other = save_checkpoint(build_model(get_config("tiny"), seed=1), tmp_path / "other")

    # Replacing it, the connection drops after the first file: the old manifest is gone already.
    real_client = storage._client

    def dropping_client():
        client = real_client()
        upload = client.upload_file
        sent = []

        def once(path, bucket, key):
            if sent:
                raise ConnectionResetError("connection reset by peer")
            sent.append(key)
            upload(path, bucket, key)
        client.upload_file = once
        return client

    monkeypatch.setattr(storage, "_client", dropping_client)
    with pytest.raises(StorageError, match="connection to the S3 endpoint was lost"):
        upload_checkpoint(other, uri)
    monkeypatch.setattr(storage, "_client", real_client)
    assert f"models/tiny/{MANIFEST}" not in _keys(s3, "models/tiny/")
    assert f"models/tiny/{storage.UPLOADING}" in _keys(s3, "models/tiny/")
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/models/tiny/{MANIFEST}: incomplete upload: a bench "
                                           rf"upload to {uri} is still running or was interrupted"):
        fetch_checkpoint(uri)
    assert _complete_in_cache(tmp_path / "cache") == []

    # A manifest whose file does not match it (overwritten or truncated behind its back).
    upload_checkpoint(other, uri)
    s3.put_object(Bucket=BUCKET, Key="models/tiny/model.safetensors", Body=b"truncated")
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/models/tiny/model.safetensors: incomplete upload: "
                                           r"9 bytes with sha256 \w+, but bench-manifest.json lists"):
        fetch_checkpoint(uri)
    assert _complete_in_cache(tmp_path / "cache") == []
    assert not any((tmp_path / "cache" / "s3").glob(".*.tmp"))  # the partial download was removed


@pytest.fixture
def corpus(tmp_path) -> Path:
    import argparse
    import textwrap

    path = tmp_path / "corpus.py.txt"
    path.write_text("\n".join(Path(m.__file__).read_text() for m in (argparse, textwrap)) * 2)
    return path


def test_train_out_s3_uploads_each_checkpoint_as_written_and_generate_reads_it(s3, corpus, tmp_path, capsys):
    uri = f"s3://{BUCKET}/runs/tiny-trained"
    args = ["train", "--model", "tiny", "--steps", "6", "--batch-size", "2", "--context", "32", "--eval-every", "3",
            "--checkpoint-every", "2", "--keep-last", "2", "--warmup-steps", "2", "--threads", "1",
            "--corpus", str(corpus), "--store", str(tmp_path / "bench.sqlite"), "--out", uri]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert SECRET not in err and "testing" not in err  # neither the secret nor the key id is ever printed
    uploaded = [line.split()[1] for line in err.splitlines() if line.startswith("uploaded ")]
    # In the order they were written: each step and each new best during training, the run's top last.
    assert uploaded[:3] == [f"{uri}/step-000002", f"{uri}/best", f"{uri}/step-000004"]
    assert uploaded[-1] == uri and f"{uri}/step-000006" in uploaded
    keys = _keys(s3, "runs/tiny-trained/")
    manifests = sorted(k.rsplit("/", 1)[0] for k in keys if k.endswith(MANIFEST))
    # keep_last=2: step-000002 was pruned from the bucket as it was locally.
    assert manifests == ["runs/tiny-trained", "runs/tiny-trained/best", "runs/tiny-trained/step-000004",
                         "runs/tiny-trained/step-000006"]
    assert "runs/tiny-trained/step-000006/training_state.pt" in keys
    assert {"runs/tiny-trained/run.json", "runs/tiny-trained/model.safetensors",
            "runs/tiny-trained/tokenizer.json"} <= set(keys)

    staging = storage.cache_root() / "staging"
    (local,) = staging.glob("*/tiny-trained")
    outputs = []
    for checkpoint in (uri, str(local)):
        assert main(["generate", "--checkpoint", checkpoint, "--prompt", "def main(", "--max-new-tokens", "6",
                     "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6

    assert main([*args, "--json"]) == 0  # the same key again: cached locally, nothing uploaded
    summary = json.loads(capsys.readouterr().out)
    assert summary["cached"] is True and summary["uploaded"] == []

    # A prefix that holds objects but no run staged here is refused before anything is written.
    other = f"s3://{BUCKET}/models/taken"
    s3.put_object(Bucket=BUCKET, Key="models/taken/notes.txt", Body=b"someone else's")
    assert main([*args[:-1], other]) == 2
    assert "already holds objects" in capsys.readouterr().err
    assert _keys(s3, "models/taken/") == ["models/taken/notes.txt"]


def test_bench_run_on_an_s3_checkpoint_then_export_to_s3(s3, checkpoint, tmp_path, capsys):
    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    store = str(tmp_path / "bench.sqlite")
    rc = main(["run", "--checkpoint", uri, "--backend", "eager", "--batch", "1", "--threads", "1",
               "--prompt-len", "8", "--gen-len", "4", "--launches", "1", "--budget", "0.3", "--no-parity",
               "--store", store, "--json"])
    out = capsys.readouterr()
    (cell,) = json.loads(out.out)
    assert rc == 0 and cell["status"] == "ok", cell.get("reason")
    assert Path(cell["model"]).name == "tiny" and Path(cell["model"]).is_relative_to(storage.cache_root())

    to = f"s3://{BUCKET}/exports/run.json"
    assert main(["export", "latest", "--format", "json", "--store", store, "--to", to]) == 0
    capsys.readouterr()
    assert main(["export", "latest", "--format", "json", "--store", store]) == 0
    local_text = capsys.readouterr().out
    remote = s3.get_object(Bucket=BUCKET, Key="exports/run.json")
    assert remote["Body"].read().decode() == local_text and remote["ContentType"] == "application/json"

    rc = main(["export", "latest", "--store", store, "--to", str(tmp_path / "x.json")])
    assert rc == 2 and "must be s3://bucket/key" in capsys.readouterr().err


def test_lists_and_sweep_files_name_s3_checkpoints_beside_presets(s3, checkpoint, tmp_path):
    from bench.cli import make_parser
    from bench.cli.run import build_sweep

    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    local = fetch_checkpoint(uri).as_posix()
    assert storage.localize(f"{uri},tiny") == f"{local},tiny"
    assert storage.localize([uri, "small"]) == [local, "small"]
    toml = tmp_path / "sweep.toml"
    toml.write_text(f'[sweep]\nmodel = ["{uri}", "tiny"]\nbackend = "eager"\n')
    sweep = build_sweep(make_parser().parse_args(["run", "--config", str(toml)]))
    assert sweep.models == [local, "tiny"]


def test_concurrent_fetches_share_one_complete_directory(s3, checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    upload_checkpoint(checkpoint, f"s3://{BUCKET}/copies/tiny-copy")  # the same content under another name
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(fetch_checkpoint, [uri] * 3 + [f"s3://{BUCKET}/copies/tiny-copy"]))
    assert len(set(paths[:3])) == 1 and paths[3].name == "tiny-copy" and paths[3].parent == paths[0].parent
    for p in paths:
        assert (p / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert not any(storage.cache_root().glob(".*.tmp"))


# -- a plain directory: uploaded by another tool, no bench manifest ------------------------

def _llama_checkpoint(tmp_path, name="plain", seed=0, **changes) -> Path:
    from dataclasses import replace

    return save_checkpoint(build_model(replace(get_config("llama-tiny"), **changes), seed=seed), tmp_path / name)


def _logits(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(directory)(torch.tensor([[1, 2, 3, 4, 5]]))[0]


def _count_requests(monkeypatch) -> list[str]:
    """The S3 operations every client of model.storage sends from now on, by name."""
    operations = []
    real_client = storage._client

    def counting_client():
        client = real_client()
        client.meta.events.register("before-call.s3", lambda model, **_: operations.append(model.name))
        return client

    monkeypatch.setattr(storage, "_client", counting_client)
    return operations


def test_a_plain_directory_put_with_boto3_loads_and_a_second_fetch_only_lists(s3, tmp_path, monkeypatch, capsys):
    checkpoint = _llama_checkpoint(tmp_path)
    for p in checkpoint.iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"models/plain/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket=BUCKET, Key="models/plain/", Body=b"")  # a console's "folder" object
    s3.put_object(Bucket=BUCKET, Key="models/plain/original/consolidated.00.pth", Body=b"not part of it")
    uri = f"s3://{BUCKET}/models/plain"
    operations = _count_requests(monkeypatch)
    local = fetch_checkpoint(uri)
    assert local.name == "plain" and sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(_logits(local), _logits(checkpoint))
    assert operations[:2] == ["GetObject", "ListObjectsV2"] and operations.count("GetObject") == 3
    assert capsys.readouterr().err == ""  # both verified by their MD5 ETags: no "checked by size only" note

    operations.clear()
    assert fetch_checkpoint(uri) == local
    assert operations == ["GetObject", "ListObjectsV2"]  # the manifest looked up (none), the prefix listed

    other = _llama_checkpoint(tmp_path, "other", seed=1)
    s3.put_object(Bucket=BUCKET, Key="models/plain/model.safetensors", Body=(other / "model.safetensors").read_bytes())
    changed = fetch_checkpoint(uri)
    assert changed != local and torch.equal(_logits(changed), _logits(other))


def test_a_multipart_upload_is_checked_by_its_recomputed_etag(s3, tmp_path, capsys):
    from boto3.s3.transfer import TransferConfig

    checkpoint = _llama_checkpoint(tmp_path, vocab_size=8192)  # 5.4 MiB: two parts of 5 MiB
    five_mib = TransferConfig(multipart_threshold=1, multipart_chunksize=5 << 20)
    for p in checkpoint.iterdir():
        s3.upload_file(str(p), BUCKET, f"models/multipart/{p.name}", Config=five_mib)
    etags = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="models/multipart/")["Contents"]}
    assert etags["models/multipart/model.safetensors"].endswith('-2"')
    assert etags["models/multipart/config.json"].endswith('-1"')
    local = fetch_checkpoint(f"s3://{BUCKET}/models/multipart")
    assert torch.equal(_logits(local), _logits(checkpoint))
    assert capsys.readouterr().err == ""  # every multipart ETag reproduced: none checked by size only


def test_parts_of_unequal_sizes_are_checked_by_size_and_said_so(s3, tmp_path, capsys):
    checkpoint = _llama_checkpoint(tmp_path)
    for p in checkpoint.iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"models/uneven/{p.name}", Body=p.read_bytes())
    data = bytes(range(256)) * (12 << 12)  # 12 MiB sent as parts of 6, 5 and 1 MiB
    key = "models/uneven/extra.bin"
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    parts, start = [], 0
    for number, size in enumerate((6 << 20, 5 << 20, 1 << 20), start=1):
        part = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number,
                              Body=data[start:start + size])
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
        start += size
    s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    local = fetch_checkpoint(f"s3://{BUCKET}/models/uneven")
    assert (local / "extra.bin").read_bytes() == data and torch.equal(_logits(local), _logits(checkpoint))
    (note,) = capsys.readouterr().err.splitlines()
    assert note == (f"note: s3://{BUCKET}/{key}: checked by size only (its multipart ETag of 3 parts is not "
                    f"reproduced with parts of 4 MiB: uploaded in parts of unequal sizes)")


def test_an_object_changed_after_listing_or_corrupted_in_transfer_is_refused(s3, tmp_path, monkeypatch):
    checkpoint = _llama_checkpoint(tmp_path)
    other = _llama_checkpoint(tmp_path, "other", seed=1)
    for p in checkpoint.iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"models/plain/{p.name}", Body=p.read_bytes())
    uri = f"s3://{BUCKET}/models/plain"
    real_list = storage._list_directory

    def list_then_replace(client, listed_uri):
        files = real_list(client, listed_uri)
        s3.put_object(Bucket=BUCKET, Key="models/plain/model.safetensors",
                      Body=(other / "model.safetensors").read_bytes())
        return files

    monkeypatch.setattr(storage, "_list_directory", list_then_replace)
    with pytest.raises(StorageError, match=rf"^s3://{BUCKET}/models/plain/model.safetensors: changed since {uri} "
                                           r"was listed \(no longer ETag \"\w+\"\); run the command again$"):
        fetch_checkpoint(uri)
    assert _complete_in_cache(tmp_path / "cache") == [] and not any(storage.cache_root().glob(".*.tmp"))
    monkeypatch.setattr(storage, "_list_directory", real_list)
    assert torch.equal(_logits(fetch_checkpoint(uri)), _logits(other))  # run again: the new content

    # Replaced between its HEAD and its download (same size): the download's If-Match refuses it.
    real_head = storage._head

    def head_then_replace(client, bucket, key, etag, part_number):
        head = real_head(client, bucket, key, etag, part_number)
        if key.endswith("model.safetensors"):
            s3.put_object(Bucket=BUCKET, Key=key, Body=(checkpoint / "model.safetensors").read_bytes())
        return head

    s3.put_object(Bucket=BUCKET, Key="models/plain/config.json", Body=b'{"not": "the one cached"}')
    monkeypatch.setattr(storage, "_head", head_then_replace)
    with pytest.raises(StorageError, match=r"model.safetensors: changed since .* was listed"):
        fetch_checkpoint(uri)
    monkeypatch.setattr(storage, "_head", real_head)
    s3.put_object(Bucket=BUCKET, Key="models/plain/config.json", Body=(checkpoint / "config.json").read_bytes())

    # Bytes that do not hash to the single-part ETag (here flipped after the download) are refused.
    s3.put_object(Bucket=BUCKET, Key="models/plain/model.safetensors",
                  Body=(checkpoint / "model.safetensors").read_bytes())
    real_client = storage._client

    def corrupting_client():
        client = real_client()
        download = client.download_file

        def corrupt(bucket, key, path, **kwargs):
            download(bucket, key, path, **kwargs)
            with open(path, "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 1]))
        client.download_file = corrupt
        return client

    monkeypatch.setattr(storage, "_client", corrupting_client)
    with pytest.raises(StorageError, match=r"config.json: the download's MD5 is \w+ but the object's single-part "
                                           r"ETag is \"\w+\"; run the command again"):
        fetch_checkpoint(uri)
    assert len(_complete_in_cache(tmp_path / "cache")) == 1  # only the earlier, verified one


def test_a_plain_directory_without_config_json_is_one_line(s3, tmp_path, capsys):
    checkpoint = _llama_checkpoint(tmp_path)
    s3.put_object(Bucket=BUCKET, Key="models/noconfig/model.safetensors",
                  Body=(checkpoint / "model.safetensors").read_bytes())
    uri = f"s3://{BUCKET}/models/noconfig"
    rc = main(["generate", "--checkpoint", uri, "--prompt-ids", "1", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err == (f"error: {uri}: not a checkpoint: no config.json directly under this prefix "
                               f"(and no {MANIFEST})\n")
    upload_checkpoint(checkpoint, f"s3://{BUCKET}/runs/only-subdirs/best")  # only sub-checkpoints under it
    with pytest.raises(StorageError, match=r"runs/only-subdirs: not a checkpoint: no config.json directly under "
                                           r"this prefix \(and no bench-manifest.json\); its sub-directories are "
                                           r"checkpoints of their own: best/$"):
        fetch_checkpoint(f"s3://{BUCKET}/runs/only-subdirs")


def test_a_bench_upload_or_delete_leaves_its_marker_when_interrupted(s3, checkpoint, monkeypatch):
    uri = f"s3://{BUCKET}/models/tiny"
    upload_checkpoint(checkpoint, uri)
    assert storage.UPLOADING not in " ".join(_keys(s3, "models/tiny/"))  # removed once the manifest is there
    real_client = storage._client

    def failing_client(operation):
        def make():
            client = real_client()
            real = getattr(client, operation)

            def fail(*args, **kwargs):
                if kwargs.get("Key", "").endswith(storage.UPLOADING) or operation == "delete_objects":
                    raise ConnectionResetError("connection reset by peer")
                return real(*args, **kwargs)
            setattr(client, operation, fail)
            return client
        return make

    # Interrupted before the marker is removed, the new manifest written: the manifest wins.
    monkeypatch.setattr(storage, "_client", failing_client("delete_object"))
    with pytest.raises(StorageError, match="connection to the S3 endpoint was lost"):
        upload_checkpoint(_llama_checkpoint(Path(checkpoint).parent, "newer"), uri)
    monkeypatch.setattr(storage, "_client", real_client)
    assert f"models/tiny/{storage.UPLOADING}" in _keys(s3, "models/tiny/")
    assert torch.equal(_logits(fetch_checkpoint(uri)), _logits(Path(checkpoint).parent / "newer"))

    # A delete interrupted after the manifest went: refused, not read as a plain directory.
    monkeypatch.setattr(storage, "_client", failing_client("delete_objects"))
    with pytest.raises(StorageError, match="connection to the S3 endpoint was lost"):
        storage.delete_checkpoint(uri)
    monkeypatch.setattr(storage, "_client", real_client)
    assert f"models/tiny/{MANIFEST}" not in _keys(s3, "models/tiny/")
    with pytest.raises(StorageError, match=rf"{MANIFEST}: incomplete upload: a bench upload to {uri} is still "
                                           rf"running or was interrupted \(its {storage.UPLOADING} marker"):
        fetch_checkpoint(uri)


def test_a_manifest_written_before_the_marker_existed_still_loads_by_its_manifest(s3, checkpoint, monkeypatch):
    upload_checkpoint(checkpoint, f"s3://{BUCKET}/models/tiny")
    for key in _keys(s3, "models/tiny/"):  # as an older bench left it: files and manifest, never a marker
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        s3.put_object(Bucket=BUCKET, Key=key.replace("models/tiny/", "models/older/"), Body=body)
    operations = _count_requests(monkeypatch)
    local = fetch_checkpoint(f"s3://{BUCKET}/models/older")
    assert torch.equal(_logits(local), _logits(checkpoint))
    assert operations.count("ListObjectsV2") == 0  # the manifest found, the prefix not listed
