"""Workloads worth taking over: orchestration of what the local models do for a workload.

``triage``: a calibrated classifier answers ``POST /v1/triage`` and, for workloads whose
``local_model`` is a classifier, ``/v1/chat/completions`` in the workload's output template.
Model work goes through ``models.client.LocalClient``; this package decides and renders.
"""
