"""Create (or update) a Prefect deployment for every flow of sft-select, on one process work pool.

    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/deploy.py [--pool sft-select] [--name default]

The flows come from the one list in ``sft_select.flows.registry`` (``METHODS`` and ``OTHER_FLOWS``),
so a new flow gets its deployment by being added there; nothing here names a method.

Each deployment

- runs its flow by module path (``sft_select.flows.<module>.<flow>``): a worker imports it from the
  Python environment it runs in, where the project is installed (editable, from this folder). There
  is no pull step, no image and no path of this machine in the deployment;
- has default parameters, so the UI's Run button works on a fresh server: a flow whose single
  argument is a pydantic model ``params`` gets values for that model's required fields from
  ``DEFAULTS`` (the shipped demo pool and the dataset ``demo`` it is ingested as); every other field
  keeps the model's own default, shown in the UI's form;
- enforces its parameter schema, so the server rejects parameters the flow would not accept.

One example schedule, ``NIGHTLY``: every night at 02:00 UTC, run a method on the latest version of a
dataset. Signals are stored per example (keyed by content id), so the nightly run computes them only
for the examples ingested since the last run and reuses the rest.

Running the script again updates the deployments in place.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Schedule
from prefect.settings import PREFECT_API_URL
from prefect.workers.process import ProcessWorker

from sft_select.flows.demo import DEMO_POOL
from sft_select.flows.registry import METHODS, OTHER_FLOWS, load_flow, params_model

POOL = "sft-select"
DEPLOYMENT_NAME = "default"

# Values for required fields of the flows' params models, by field name.
DEFAULTS: dict[str, Any] = {
    "path": str(DEMO_POOL),  # ingest: the demo pool shipped with the package
    "name": "demo",  # ingest: register it as the dataset "demo"
    "dataset": "demo",  # methods: select from the latest version of "demo"
}

# The example schedule: (flow, cron in UTC, parameters of the runs it creates).
# AlpaGasus rates with the configured judge; ratings are signals, so each night pays only for new examples.
NIGHTLY: tuple[str, str, dict[str, Any]] = (
    "alpagasus", "0 2 * * *", {"params": {"dataset": "demo", "budget": 0.1, "threshold": None}})


def default_parameters(name: str, flow: Flow) -> dict[str, Any]:
    """Deployment defaults: the required fields of the flow's params model, filled from ``DEFAULTS``
    and checked against the model, so a stale default fails here rather than in a flow run."""
    try:
        model = params_model(flow)
    except KeyError:  # a flow with plain arguments keeps its own defaults
        return {}
    required = [field for field, info in model.model_fields.items() if info.is_required()]
    missing = [field for field in required if field not in DEFAULTS]
    if missing:
        raise SystemExit(f"flow {name!r}: no deployment default for required field(s) {missing}; "
                         "add them to DEFAULTS in deployments/deploy.py")
    values = {field: DEFAULTS[field] for field in required}
    model(**values)  # raises a ValidationError naming the field when a default no longer fits
    return {"params": values}


def schedules_for(name: str) -> list[Schedule]:
    flow_name, cron, parameters = NIGHTLY
    return [Cron(cron, timezone="UTC", parameters=parameters, slug="nightly")] if name == flow_name else []


def build_deployments(deployment_name: str = DEPLOYMENT_NAME) -> list[RunnerDeployment]:
    """One deployment per flow in the registry (selection methods tagged ``method``)."""
    if NIGHTLY[0] not in METHODS | OTHER_FLOWS:
        raise SystemExit(f"the nightly schedule names {NIGHTLY[0]!r}, which is not in the flow registry")
    deployments = []
    for name in [*OTHER_FLOWS, *METHODS]:
        flow = load_flow(name)
        deployments.append(flow.to_deployment(
            name=deployment_name,
            parameters=default_parameters(name, flow),
            schedules=schedules_for(name),
            tags=["sft-select", "method" if name in METHODS else name],
            entrypoint_type=EntrypointType.MODULE_PATH,
            enforce_parameter_schema=True,
        ))
    return deployments


def ensure_pool(pool: str) -> None:
    """Create the process work pool unless it exists (with the process worker's default job template)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                description="sft-select flows, run as local processes"))
            print(f"created process work pool {pool!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default=POOL, help=f"process work pool to deploy to (default {POOL})")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="name of every deployment (default %(default)s)")
    args = parser.parse_args(argv)

    api = PREFECT_API_URL.value()
    if not api:
        print("PREFECT_API_URL is not set: start a server (`prefect server start`) and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    with get_client(sync_client=True) as client:
        if (error := client.api_healthcheck()) is not None:
            print(f"no Prefect server answers at {api}: {error}", file=sys.stderr)
            return 2

    ensure_pool(args.pool)
    for deployment in build_deployments(args.name):
        deployment_id = deployment.apply(work_pool_name=args.pool)
        crons = [f"cron '{s.schedule.cron}' {s.schedule.timezone}" for s in deployment.schedules or []]
        when = ", ".join(crons) or "on demand"
        print(f"{deployment.full_name:<28} {deployment_id}  {when}")
    example = '{"params": {"dataset": "demo"}}'
    print(f"\nStart a worker: prefect worker start --pool {args.pool}\n"
          f"Run one:        prefect deployment run 'longest/{args.name}' --params '{example}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
