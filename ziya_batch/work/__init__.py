"""The job's work without Ray: the worker loop, generating a shard, the models a worker holds, the failure policy
and the commit path. Ray actors (runtime/) wrap these plain classes; this package never imports ray."""
