"""Request and response models: validation at the edge and the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, EmailStr, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class SignupRequest(_Strict):
    email: EmailStr = Field(max_length=320)
    password: str = Field(min_length=8, max_length=1024)


class SignupResponse(BaseModel):
    message: str
    user_id: UUID


class LoginRequest(_Strict):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class LoginResponse(BaseModel):
    user_id: UUID
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int


class RefreshRequest(_Strict):
    refresh_token: str = Field(min_length=1, max_length=4096)


class TokenResponse(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int


class MessageResponse(BaseModel):
    message: str


class UserResponse(BaseModel):
    user_id: UUID
    email: str
    role: str
    created_at: datetime


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    ready: bool
    checks: dict[str, bool]
