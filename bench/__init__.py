"""Benchmarks: dicomlab beside DCMTK, Orthanc and pynetdicom's apps (``make bench``)."""
