"""gRPC plumbing shared by the services: the status table, the server builder, conversions.

The protobuf modules are generated from protos/ into ffnskip.v1 by
`python -m ffnskip.rpc.codegen` (the Makefile's setup runs it).
"""
