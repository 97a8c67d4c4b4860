"""The DICOM face of dicomlab: one package per service, each a plugin."""
