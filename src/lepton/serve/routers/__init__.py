"""The server's routes, one ``APIRouter`` per concern: health, the native v1 API, the Open Inference Protocol
v2 and admin actions. ``lepton.serve.app.create_app`` includes them all."""
