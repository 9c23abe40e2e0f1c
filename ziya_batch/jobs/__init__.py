"""The jobs service: every surface (the `ziya-batch` command, `run`, the HTTP API, OpenAI batches, the
worker's finalize after a commit) submits, finds, cancels and finishes jobs through these functions, so a
job behaves the same whichever way it was reached.

Layer: below cli/, api/ and runtime/, above queue/ and io/. No Ray and no torch here (tests/unit/
test_import_graph.py checks it); the broker is anything with the JobsBroker protocol (protocols.py).

    status = jobs.submit_job(spec, broker)          # idempotent: the same spec and output resumes
    jobs.cancel_job(broker, status.job_id)          # cancels, and writes the manifest if nothing runs
    jobs.get_manifest(broker, status.job_id)
    jobs.forget_job(broker, status.job_id)          # a finished job's records leave Redis; its output stays
"""
from .finalize import finalize_if_ready, finish_empty_job
from .forget import ForgottenJob, describe_forgotten, forget_finished_before, forget_job, parse_duration
from .service import (API_HINT, CLI_HINT, ManifestNotReady, cancel_job, get_manifest, job_status,
                      list_jobs, unserved_note, waiting_note, waiting_notes)
from .submit import absolute_locations, check_model, check_output_owner, job_id_for, list_inputs, submit_job

__all__ = ["absolute_locations", "API_HINT", "CLI_HINT", "ForgottenJob", "ManifestNotReady", "cancel_job",
           "check_model", "check_output_owner", "describe_forgotten", "finalize_if_ready", "finish_empty_job",
           "forget_finished_before", "forget_job", "get_manifest", "job_id_for", "job_status", "list_inputs",
           "list_jobs", "parse_duration", "submit_job", "unserved_note", "waiting_note", "waiting_notes"]
