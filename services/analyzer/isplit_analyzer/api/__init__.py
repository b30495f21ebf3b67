"""The analyzer's HTTP API: health, models and analyses routes, their dependencies and the
one mapping from errors to problem-details responses."""

from fastapi import APIRouter

from isplit_analyzer.api.routes import analyses, health, models

router = APIRouter()
router.include_router(health.router)
router.include_router(models.router)
router.include_router(analyses.router)
