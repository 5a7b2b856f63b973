// GET /docs: Swagger UI over this service's OpenAPI schema, from files the service ships (no CDN, no inline
// script: the page's Content-Security-Policy allows this origin's script files only).
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,  // the default asks validator.swagger.io about the schema: another host
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
