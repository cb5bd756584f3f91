from hypothesis import given
from hypothesis import strategies as st

from memory.redact import redact


def test_personal_data_is_replaced_with_typed_placeholders():
    text = ("mail me at ann.lee+bot@example.co.uk or call +44 20 7946 0958, "
            "card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, account no. 12345678, "
            "I live at 221 Baker Street, link https://x.io/reset?token=abc123&u=1 and "
            "bot 123456789:AAH3xkz9qLmN0pQrStUvWxYz12345678901")
    out = redact(text)
    for secret in ["ann.lee", "7946", "4111", "DE89", "12345678", "Baker Street", "abc123", "AAH3xkz9"]:
        assert secret not in out, secret
    for tag in ["[email]", "[phone]", "[card]", "[iban]", "[account]", "[address]", "[url]", "[secret]"]:
        assert tag in out, tag


def test_ordinary_text_numbers_and_emoji_survive():
    text = "I turned 30 in 2019 🎉, it's 5 km away, see https://example.com/page?id=7 — 3 cats!"
    assert redact(text) == text


def test_a_number_that_fails_luhn_is_not_a_card_but_may_be_a_phone():
    assert "[card]" not in redact("order 1234 5678 9012 3456")


def test_bot_tokens_in_bot_api_urls_and_api_keys_are_secrets():
    token = "123456789:AAH3xkz9qLmN0pQrStUvWxYz12345678901"
    assert redact(f"see https://api.telegram.org/bot{token}/getMe") == "see https://api.telegram.org/bot[secret]/getMe"
    keys = {"openai": "sk-" + "Ab3dE" * 8, "openai project": "sk-proj-" + "x9_Yz-" * 8, "github": "ghp_" + "a1B2c3" * 6,
            "github fine-grained": "github_pat_" + "11ABCDE" * 12, "aws": "AKIAIOSFODNN7EXAMPLE",
            "hugging face": "hf_" + "AbCdEfGh" * 5, "google": "AIza" + "SyD-9tSrke72PouQMnMX7" + "abcdefghijklmn",
            "slack": "xoxb-1234567890-" + "aBcD" * 6, "ouro": "ouro-" + "Zq3_-k8PwX2rT5yU9iO1aS4dF6gH7jK0lL2mN4bV6cC"}
    for kind, key in keys.items():
        assert redact(f"use {key} for it") == "use [secret] for it", kind
        assert redact(f"OPENAI_API_KEY={key}") == "OPENAI_API_KEY=[secret]", kind
    ordinary = "a task-force of risk-based skills, chatcmpl-ouro-42, the AKIA bit, ghp_short, sk-ip it"
    assert redact(ordinary) == ordinary


@given(st.text(max_size=300))
def test_redact_never_raises_and_is_idempotent(text):
    once = redact(text)
    assert redact(once) == once
