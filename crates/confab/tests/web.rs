//! The browser client's files as the binary serves them. (The client itself is tested in a real
//! browser by `web/e2e`.)

mod common;

use common::*;

async fn get(url: &str, if_none_match: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    if let Some(tag) = if_none_match {
        request = request.header("if-none-match", tag);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let server = TestServer::start().await;
    let page = get(&format!("{}/", server.base), None).await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/assets/js/main.js">"#));

    let script = get(&format!("{}/assets/js/main.js", server.base), None).await;
    assert_eq!(script.status(), 200);
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let etag = script.headers()["etag"].to_str().unwrap().to_string();
    assert!(script.text().await.unwrap().contains("startChat"));
    // Revalidation: an unchanged file costs a 304 and no body.
    let again = get(&format!("{}/assets/js/main.js", server.base), Some(&etag)).await;
    assert_eq!(again.status(), 304);

    for missing in [
        "/assets/nope.js",
        "/assets/index.html",
        "/assets/../Cargo.toml",
    ] {
        let response = get(&format!("{}{missing}", server.base), None).await;
        assert_eq!(response.status(), 404, "{missing}");
    }
}

#[tokio::test]
async fn the_page_can_be_switched_off() {
    let server = TestServer::start_with(|c| c.web_client = false).await;
    assert_eq!(get(&format!("{}/", server.base), None).await.status(), 404);
    assert_eq!(
        get(&format!("{}/assets/style.css", server.base), None)
            .await
            .status(),
        404
    );
    assert_eq!(
        get(&format!("{}/healthz", server.base), None)
            .await
            .status(),
        200
    );
}
