"""Clinical validation of a trained run: metrics per subgroup (``subgroups``, with ``covariates`` from manifests and
DICOM headers), decision curves and operating points (``decision``), external validation against the training data
(``external``), local recalibration as a new run (``calibrate``) and the TRIPOD+AI / CLAIM validation report
(``report``). ``lepton.evaluate.evaluate(..., by=[...], external=True)`` drives the first three."""
