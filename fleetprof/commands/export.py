"""Send the selected samples to an OTLP receiver (an OpenTelemetry Collector, Pyroscope,
another aggregator's --otlp-listen): one OTLP/gRPC ProfilesService/Export request, the one
`fleetprof flamegraph -o FILE.otlp.pb` writes (docs/otlp.md).
"""

from __future__ import annotations

import argparse
import io

from fleetprof.commands.flamegraph import add_selection_arguments, selection_from
from fleetprof.commands.options import add_source_arguments, open_profiles
from fleetprof.proto.schema import EVENT_UNITS

HELP = "send profiles to an OTLP receiver (OTLP/gRPC profiles)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    parser.add_argument(
        "--otlp-endpoint", required=True, metavar="HOST:PORT", help="the OTLP/gRPC receiver"
    )
    receiver = parser.add_argument_group("the receiver's transport security")
    receiver.add_argument("--otlp-tls-ca", metavar="PEM", help="CA that signed its certificate")
    receiver.add_argument("--otlp-tls-cert", metavar="PEM", help="this client's certificate")
    receiver.add_argument("--otlp-tls-key", metavar="PEM", help="its private key")
    receiver.add_argument("--otlp-token", help="bearer token (Authorization header)")
    receiver.add_argument(
        "--otlp-insecure", action="store_true", help="allow plaintext to a non-loopback receiver"
    )
    parser.add_argument(
        "--event", default="cpu", choices=sorted(EVENT_UNITS), help="what the weights count"
    )
    add_selection_arguments(parser)
    parser.add_argument(
        "--frequency",
        type=float,
        metavar="HZ",
        help="the agents' sampling frequency: cpu profiles then state their period",
    )


def run(args: argparse.Namespace) -> int:
    import grpc
    from opentelemetry.proto.collector.profiles.v1development import (
        profiles_service_pb2,
        profiles_service_pb2_grpc,
    )

    from fleetprof.proto.schema import MAX_MESSAGE_BYTES
    from fleetprof.proto.security import ClientSecurity
    from fleetprof.query.render import RenderOptions
    from fleetprof.query.render.base import format_weight
    from fleetprof.query.render.otlp import OtlpRenderer

    selection = selection_from(args)
    options = RenderOptions(
        title="fleetprof export",
        event=selection.event,
        unit=EVENT_UNITS[selection.event],
        frequency_hz=args.frequency,
    )
    renderer = OtlpRenderer()
    encoded = io.BytesIO()
    source = open_profiles(args)
    try:
        with source.stream(renderer.rows_sql(selection)) as rows:
            total = renderer.render_rows(rows, options, encoded)
    finally:
        source.close()
    if total == 0:
        raise ValueError(f"nothing to export: no {selection.describe()}")
    request = profiles_service_pb2.ExportProfilesServiceRequest.FromString(encoded.getvalue())
    security = ClientSecurity(
        ca=args.otlp_tls_ca,
        cert=args.otlp_tls_cert,
        key=args.otlp_tls_key,
        token=args.otlp_token,
        insecure=args.otlp_insecure,
    )
    channel_options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    with security.channel(args.otlp_endpoint, channel_options) as channel:
        stub = profiles_service_pb2_grpc.ProfilesServiceStub(channel)
        try:
            response = stub.Export(request, timeout=120, metadata=security.metadata())
        except grpc.RpcError as exc:
            raise ValueError(
                f"OTLP receiver {args.otlp_endpoint}: {exc.details() or exc.code().name}"
            ) from exc
    partial = response.partial_success
    samples = sum(
        len(profile.samples)
        for resource in request.resource_profiles
        for scope in resource.scope_profiles
        for profile in scope.profiles
    )
    print(f"sent {samples} samples ({format_weight(total, options.unit)}) to {args.otlp_endpoint}")
    if partial.rejected_profiles or partial.error_message:
        print(
            f"the receiver rejected {partial.rejected_profiles} profiles: {partial.error_message}"
        )
    return 0
