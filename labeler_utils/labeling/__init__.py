"""Labeling a large pair file with a student: inputs, the resumable chunk job, the local and Ray engines, outputs."""
