"""Hospital integration: results back into the PACS as DICOM Structured Reports (``sr``), and the DICOM node that
watches a PACS over DICOMweb, runs a model on new studies and stores its results (``node``)."""
