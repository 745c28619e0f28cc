"""`python -m services.ingress`: run the ingress service alone."""

from services.ingress.app import serve
from shared.config import settings_from_env
from shared.service import run_service

if __name__ == "__main__":
    run_service("ingress", serve, settings_from_env())
