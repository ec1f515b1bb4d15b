"""`make run` runs ensure_admin: the first run creates the admin; a later run with ADMIN_PASSWORD resets it."""

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command


@pytest.mark.django_db
class TestEnsureAdmin:
    def test_first_run_creates_admin_with_the_given_password(self, monkeypatch, capsys):
        monkeypatch.setenv("ADMIN_PASSWORD", "first-pass-123")
        call_command("ensure_admin")
        assert User.objects.get(username="admin").check_password("first-pass-123")
        assert "first-pass-123" not in capsys.readouterr().out  # a given password is not echoed

    def test_later_run_with_admin_password_resets_it(self, monkeypatch, capsys):
        monkeypatch.setenv("ADMIN_PASSWORD", "first-pass-123")
        call_command("ensure_admin")
        monkeypatch.setenv("ADMIN_PASSWORD", "second-pass-456")
        call_command("ensure_admin")
        admin = User.objects.get(username="admin")
        assert admin.check_password("second-pass-456") and admin.is_superuser
        assert User.objects.filter(is_superuser=True).count() == 1
        assert "Reset the password" in capsys.readouterr().out

    def test_later_run_without_it_keeps_the_password_and_says_how_to_reset(self, monkeypatch, capsys):
        monkeypatch.setenv("ADMIN_PASSWORD", "first-pass-123")
        call_command("ensure_admin")
        monkeypatch.delenv("ADMIN_PASSWORD")
        call_command("ensure_admin")
        assert User.objects.get(username="admin").check_password("first-pass-123")
        assert "ADMIN_PASSWORD" in capsys.readouterr().out

    def test_generated_password_is_printed_once(self, monkeypatch, capsys):
        monkeypatch.delenv("ADMIN_PASSWORD", raising=False)
        call_command("ensure_admin")
        password = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
        assert User.objects.get(username="admin").check_password(password)
