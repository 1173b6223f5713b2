//! Signing in and up, confirming the address, resetting a password.

use axum::response::{IntoResponse, Redirect, Response};

use super::api::Ctx;
use super::forms::local_path;
use super::html::{ApiForm, Nav, Page, api_form, esc, input};
use super::{query_value, signed_in};

fn public_page(ctx: &Ctx, title: &str) -> Page {
    let mut page = Page::new(title, Nav::None);
    page.notice = query_value(&ctx.uri, "notice");
    page
}

/// `GET /login`.
pub async fn login(ctx: Ctx) -> Response {
    let next = query_value(&ctx.uri, "next")
        .map(|n| local_path(&n).to_string())
        .filter(|n| !n.starts_with("/login"))
        .unwrap_or_else(|| "/dongles".to_string());
    // Someone signed in already goes on at once (unless the page says the session ended).
    if query_value(&ctx.uri, "notice").is_none() && signed_in(&ctx).await.is_ok() {
        return Redirect::to(&next).into_response();
    }
    let mut page = public_page(&ctx, "Sign in");
    let form = api_form(
        "",
        ApiForm {
            path: "/auth/login",
            next: &next,
            ok: "redirect",
            id: "login-form",
            class: "narrow",
            label: "Sign in",
            ..ApiForm::default()
        },
        &format!(
            "{}{}<button type=\"submit\">Sign in</button>",
            input(
                "login-email",
                "email",
                "Email",
                "email",
                "",
                "autocomplete=\"username\" required"
            ),
            input(
                "login-password",
                "password",
                "Password",
                "password",
                "",
                "autocomplete=\"current-password\" required"
            ),
        ),
    );
    page.body = format!(
        "{form}<p>New here? <a href=\"/signup\">Create an account</a>. \
         Forgot the password? <a href=\"/reset-password\">Reset it</a>.</p>"
    );
    page.render()
}

/// `GET /signup`.
pub async fn signup(ctx: Ctx) -> Response {
    let mut page = public_page(&ctx, "Create an account");
    let form = api_form(
        "",
        ApiForm {
            path: "/auth/signup",
            next: "/login",
            notice: "signup_sent",
            ok: "redirect",
            id: "signup-form",
            class: "narrow",
            label: "Create an account",
            ..ApiForm::default()
        },
        &format!(
            "{}{}<p class=\"hint\" id=\"signup-password-hint\">8 to 128 characters; very common \
             passwords are refused.</p><button type=\"submit\">Create the account</button>",
            input(
                "signup-email",
                "email",
                "Email",
                "email",
                "",
                "autocomplete=\"email\" required"
            ),
            input(
                "signup-password",
                "password",
                "Password",
                "password",
                "",
                "autocomplete=\"new-password\" minlength=\"8\" maxlength=\"128\" required \
                 aria-describedby=\"signup-password-hint\""
            ),
        ),
    );
    page.body = format!(
        "{form}<p>We mail a link to confirm the address. Have an account? \
         <a href=\"/login\">Sign in</a>.</p>"
    );
    page.render()
}

/// `GET /reset-password`: the request form, or with `?token=` (the mailed link) the new password form.
pub async fn reset_password(ctx: Ctx) -> Response {
    let token = query_value(&ctx.uri, "token").filter(|t| !t.is_empty());
    let mut page = public_page(&ctx, "Reset the password");
    page.body = match token {
        None => api_form(
            "",
            ApiForm {
                path: "/auth/password-reset/request",
                next: "/login",
                notice: "reset_sent",
                ok: "redirect",
                id: "reset-request-form",
                class: "narrow",
                label: "Ask for a reset link",
                ..ApiForm::default()
            },
            &format!(
                "<p>We mail a link to set a new password (valid for one hour).</p>{}\
                 <button type=\"submit\">Mail me a link</button>",
                input(
                    "reset-email",
                    "email",
                    "Email",
                    "email",
                    "",
                    "autocomplete=\"email\" required"
                ),
            ),
        ),
        Some(token) => api_form(
            "",
            ApiForm {
                path: "/auth/password-reset/confirm",
                next: "/login",
                notice: "password_changed",
                ok: "redirect",
                id: "reset-confirm-form",
                class: "narrow",
                label: "Set a new password",
                ..ApiForm::default()
            },
            &format!(
                "<input type=\"hidden\" name=\"token\" value=\"{}\">{}\
                 <button type=\"submit\">Set the password</button>",
                esc(&token),
                input(
                    "reset-password",
                    "password",
                    "New password",
                    "password",
                    "",
                    "autocomplete=\"new-password\" minlength=\"8\" maxlength=\"128\" required"
                ),
            ),
        ),
    };
    page.render()
}

/// `GET /verify-email?token=`: the mailed link. Confirming takes a click, so that a mail scanner
/// following the link does not use the token up.
pub async fn verify_email(ctx: Ctx) -> Response {
    let token = query_value(&ctx.uri, "token").unwrap_or_default();
    let mut page = public_page(&ctx, "Confirm your email address");
    page.body = api_form(
        "",
        ApiForm {
            path: "/auth/verify-email",
            next: "/login",
            notice: "verified",
            ok: "redirect",
            id: "verify-form",
            class: "narrow",
            label: "Confirm the address",
            ..ApiForm::default()
        },
        &format!(
            "<input type=\"hidden\" name=\"token\" value=\"{}\">\
             <button type=\"submit\">Confirm my address</button>",
            esc(&token)
        ),
    );
    page.render()
}
