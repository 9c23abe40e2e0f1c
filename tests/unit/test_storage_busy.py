"""An object store that answers "try again" (S3's 503 Slow Down / Service Unavailable, 500 Internal Error, after
its client's own retries) is a store that does not serve us now, the symptom of an S3 outage or of throttling under
many workers: such a failure gives the shard back untried (work/failures.py storage_calls) and makes a finalize
wait (jobs/finalize.py), as a refused connection or a time-out does. s3fs turns those answers into OSError with
errno EBUSY (503, SlowDown) or EREMOTEIO (500); before, they were taken for the shard's own failure: each counted as
a failed try, so a store-wide outage seen as 503s dead-lettered whole shards and failed finalizing jobs."""
import errno

import pytest

from ziya_batch.io.storage import unreachable
from ziya_batch.work.failures import Action, Stage, StorageAway, decide, storage_calls


def _s3fs_error(code: str, status: int) -> OSError:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": f"{code} ({status})"},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))


@pytest.mark.parametrize("code,status", [("SlowDown", 503), ("ServiceUnavailable", 503), ("InternalError", 500),
                                         ("503", 503)])
def test_an_s3_try_again_answer_gives_the_shard_back_untried(code, status):
    err = _s3fs_error(code, status)
    assert isinstance(err, OSError) and err.errno in (errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO))
    assert unreachable(err), f"S3 {status} {code} is taken for the shard's own failure"
    with pytest.raises(StorageAway) as got:
        with storage_calls():
            raise err
    assert decide(got.value, Stage.READ, "w").action is Action.GIVE_BACK


@pytest.mark.parametrize("code,status", [("AccessDenied", 403), ("NoSuchKey", 404), ("NoSuchBucket", 404)])
def test_an_s3_answer_about_the_location_stays_the_shards_failure(code, status):
    err = _s3fs_error(code, status)
    assert not unreachable(err)
    with pytest.raises(OSError):
        with storage_calls():
            raise err
