"""Searching schedules: MetaSchedule driven over the prepared kernels (`tune`), the XGBoost cost
model, the crash-safe tuning log (a MetaSchedule database), the lean builder workers, and
remote measurement over TVM RPC.

May import: support, frontend, kernels, passes.
"""
