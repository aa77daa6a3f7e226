"""Redis-backed stores: calibration profiles, the calibration job queue, the decoder registry.

Every store method turns Redis connection failures into ffnskip.errors.Unavailable, so
callers only ever see the project's error taxonomy.

Key layout (prefix `ffnskip:`; {model} is the model id, {n} a profile version):

    ffnskip:profile:{model}:v{n}          immutable profile JSON (written with SET NX)
    ffnskip:profile:{model}:plot:v{n}     PNG bytes of the profile's similarity plot
    ffnskip:profile:{model}:substitutes:v{n}  the profile's FFN substitutes (SubstituteSet bytes)
    ffnskip:profile:{model}:versions      sorted set of published versions (history)
    ffnskip:profile:{model}:next          INCR counter that allocates versions (gaps are fine)
    ffnskip:profile:{model}:active        the active version
    ffnskip:profile:{model}:activations   list (stack) of activated versions, for rollback;
                                          invariant: active == its last element
    ffnskip:models                        set of model ids that have profiles
    ffnskip:profile-events                pub/sub channel, JSON {model, version, action: activate|rollback}
    ffnskip:jobs                          jobs stream, consumer group `calibrators`
    ffnskip:job:{id}                      job record hash
    ffnskip:job-idem:{key}                idempotency key -> job id
    ffnskip:jobs:dead                     dead-letter stream
    ffnskip:decoder:{id}                  decoder registry entry (JSON, with TTL)
    ffnskip:decoders                      set of registered decoder ids
"""

from ffnskip.store.connection import REDIS_ENV_VARS, RedisSettings, connect, redis_errors
from ffnskip.store.jobs import ClaimedJob, JobQueue
from ffnskip.store.profiles import ProfileEvents, ProfileStore
from ffnskip.store.registry import DecoderRegistry

__all__ = [
    "REDIS_ENV_VARS",
    "ClaimedJob",
    "DecoderRegistry",
    "JobQueue",
    "ProfileEvents",
    "ProfileStore",
    "RedisSettings",
    "connect",
    "redis_errors",
]
