"""Typed dependencies of the routes: the service's state, its settings, a database session and
the job runner, each injected with ``Depends`` (tests override them through the app)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from isplit_analyzer.config import Settings
from isplit_analyzer.jobs import JobRunner
from isplit_analyzer.results import ResultsConsumer


@dataclass
class State:
    """What the running service holds (``app.state.isplit``), made by the app's lifespan."""

    settings: Settings
    sessions: sessionmaker[Session]
    runner: JobRunner
    results: ResultsConsumer


def get_state(request: Request) -> State:
    return request.app.state.isplit


StateDep = Annotated[State, Depends(get_state)]


def get_settings(state: StateDep) -> Settings:
    return state.settings


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


def get_runner(state: StateDep) -> JobRunner:
    return state.runner


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
