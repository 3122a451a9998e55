"""Hospital integration below the PACS node: DICOMweb as a data source, de-identification."""
